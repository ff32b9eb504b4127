"""Up-front data checks at setup: full image decodes, a cached verdict, empty splits, huge images."""

import io
import json
import re

import datasets
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from medvr.data import FEATURES, HFVQASource, RecordError, SyntheticVQA, VQADataModule, generate, records_dataset


class _InMemorySource:
    name = "in-memory"

    def __init__(self, splits: dict[str, list[dict]]):
        self.splits = datasets.DatasetDict(
            {split: records_dataset(rows) for split, rows in splits.items()}
        )

    def load(self):
        return self.splits


def _records(n: int, split: str = "test") -> list[dict]:
    return [item.record for item in generate(n, seed=0, split=split)]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _count_decodes(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the images whose pixels PIL decodes from now on."""
    sizes, load = [], ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # pixels not decoded yet
            sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return sizes


@pytest.mark.parametrize("stored", ["bytes", "file"])
def test_a_truncated_png_is_named_by_split_row_id_and_path_at_setup(tmp_path, monkeypatch, stored):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it
    records = _records(3)
    png = _png(records[1]["image"])
    if stored == "file":
        path = tmp_path / "scan.png"
        path.write_bytes(png[: len(png) // 2])
        records[1]["image"], image = str(path), re.escape(f"image file '{path}'")
    else:
        records[1]["image"] = {"bytes": png[: len(png) // 2], "path": None}
        image = r"image \(bytes stored in the dataset\)"
    source = _InMemorySource({"train": _records(4, "train"), "test": records})
    module = VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(tmp_path / "verdicts"))
    expected = rf"in-memory/test row 1 \(id=syn-test-00001\): {image} cannot be decoded \(.*truncated.*\); re-save it"
    with pytest.raises(RecordError, match=expected):
        module.setup("fit")
    assert module.splits is None and not (tmp_path / "verdicts").exists()  # only a pass is cached
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # the caller's setting is restored


def test_a_passing_verdict_is_cached_per_dataset_version(tmp_path, monkeypatch):
    decodes = _count_decodes(monkeypatch)
    verdicts = tmp_path / "verdicts"
    source = SyntheticVQA(n_train=6, n_val=4, n_test=4, seed=0, cache_dir=str(tmp_path / "data"))
    VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(verdicts)).setup("fit")
    assert len(decodes) == 14
    assert [p.suffix for p in verdicts.iterdir()] == [".json"]  # one verdict, no temp file left

    decodes.clear()
    again = VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(verdicts))
    again.setup("fit")  # the same dataset, read from disk again
    assert decodes == [] and again.splits["val"]["id"] == [f"syn-val-{i:05d}" for i in range(4)]

    other = SyntheticVQA(n_train=6, n_val=4, n_test=4, seed=1, cache_dir=str(tmp_path / "data"))
    VQADataModule(other, batch_size=2, eval_batch_size=2, verdict_cache=str(verdicts)).setup("fit")
    assert len(decodes) == 14 and len(list(verdicts.iterdir())) == 2


def test_an_image_file_changed_after_its_check_is_checked_again(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    scans = [tmp_path / "images" / f"{i}.png" for i in range(2)]
    for scan, record in zip(scans, _records(2)):
        record["image"].save(scan)
    rows = [{"id": f"j{i}", "image": str(scan), "question": "Q?", "options": ["u", "v"], "answer": "A",
             "modality": "CT"} for i, scan in enumerate(scans)]
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    source = HFVQASource(str(data_file), {"train": "train"}, cache_dir=str(tmp_path / "hf"))
    VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(tmp_path / "v")).setup("fit")
    decodes = _count_decodes(monkeypatch)
    VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(tmp_path / "v")).setup("fit")
    assert decodes == []

    png = scans[1].read_bytes()
    scans[1].write_bytes(png[: len(png) // 2])  # same dataset rows, a broken file behind one
    with pytest.raises(RecordError, match=rf"train row 1 \(id=j1\): image file '{re.escape(str(scans[1]))}'"):
        VQADataModule(source, batch_size=2, eval_batch_size=2, verdict_cache=str(tmp_path / "v")).setup("fit")


def test_an_empty_split_fails_at_setup_naming_the_source_and_split(tmp_path, monkeypatch):
    decodes = _count_decodes(monkeypatch)
    source = _InMemorySource({"train": _records(2, "train"), "test": _records(2)})
    source.splits["val"] = datasets.Dataset.from_dict({field: [] for field in FEATURES}, features=FEATURES)
    with pytest.raises(ValueError, match=r"data source 'in-memory' split 'val' has 0 rows.*data.source.splits.val="):
        VQADataModule(source, batch_size=2, eval_batch_size=2).setup("fit")
    assert decodes == []  # found before any image is decoded


def test_a_100_megapixel_image_is_downscaled_once_with_its_bbox(tmp_path, monkeypatch):
    huge = Image.new("L", (10_000, 10_000), 20)  # 100 MP: above PIL's decompression-bomb warning
    ImageDraw.Draw(huge).rectangle([6000, 3000, 6999, 3999], fill=250)
    huge.save(tmp_path / "huge.png")
    records = _records(2)
    records[1]["image"], records[1]["bbox"] = str(tmp_path / "huge.png"), [6000, 3000, 7000, 4000]
    datasets.DatasetDict({"test": records_dataset(records)}).save_to_disk(
        str(tmp_path / "data")
    )
    source = HFVQASource(str(tmp_path / "data"), {"test": "test"})
    limit, verdicts = 4_000_000, str(tmp_path / "verdicts")
    module = VQADataModule(source, batch_size=2, eval_batch_size=2, max_image_pixels=limit, verdict_cache=verdicts)
    module.setup("test")

    stored = module.splits["test"].cast_column("image", datasets.Image(decode=False))
    assert Image.open(io.BytesIO(stored[1]["image"]["bytes"])).size == (2000, 2000)
    assert Image.open(io.BytesIO(stored[0]["image"]["bytes"])).size == records[0]["image"].size  # untouched
    decodes = _count_decodes(monkeypatch)
    record = next(iter(module.test_dataloader()))[1]
    assert record["image"].size == (2000, 2000) and record["bbox"] == [1200, 600, 1400, 800]
    pixels = np.asarray(record["image"])
    assert pixels[605:795, 1205:1395].min() > 240 and pixels[:550].max() < 30  # the box still frames the lesion
    assert max(w * h for w, h in decodes) <= limit  # the fetch decoded only the small copy

    decodes.clear()
    again = VQADataModule(source, batch_size=2, eval_batch_size=2, max_image_pixels=limit, verdict_cache=verdicts)
    again.setup("test")  # the verdict and the downscaled copy both come from the cache
    assert decodes == [] and again.splits["test"][1]["bbox"] == [1200, 600, 1400, 800]
