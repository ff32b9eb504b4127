"""PathVQA (He et al., arXiv 2003.10286) as the hub copy (flaviagiammarino/path-vqa) unpacks, as medvr records.

Layout: DIR/data/{train,validation,test}-*.parquet with image ({bytes, path}), question and answer;
a yes/no answer marks a closed question. The download ships its own validation split.
"""

from medvr.data.hub_parquet import Item, TextAnswerSource, read_hub_parquet

LAYOUT = ("DIR/data/train-*.parquet, DIR/data/validation-*.parquet and DIR/data/test-*.parquet "
          "(image, question, answer), as the hub copy flaviagiammarino/path-vqa unpacks")


class PathVQA(TextAnswerSource):
    """Data source over a PathVQA download. Records: id "path_vqa/<hub split>/<row>", dataset "PathVQA"."""

    name = "path_vqa"

    def native(self) -> dict[str, list[Item]]:
        if not (self.path / "data").is_dir():
            raise FileNotFoundError(f"PathVQA: '{self.path / 'data'}' does not exist; data.path must be the folder "
                                    f"holding {LAYOUT}")
        return read_hub_parquet(self.path, "path_vqa", self.modality, "PathVQA", LAYOUT)
