"""MedVLM-R1's evaluation file (`MRI_CT_XRAY_300each_dataset.json`, arXiv 2502.19634) as medvr records.

The file is a JSON list of 900 OmniMedVQA-derived items, 300 each of MRI, CT and X-ray in that
order; each row has `image` (a list of paths relative to an image folder), `question`, `options`
(texts, maybe prefixed "A." / "A)"), `solution` (the key letter, maybe as "<answer> B </answer>")
and `subset` (OmniMedVQA's modality name). It has no training items: it serves val and test.
"""

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import datasets

from medvr.data.schema import LETTERS, RecordError, records_dataset

log = logging.getLogger(__name__)

_LETTER_PREFIX = r"^\(?{letter}\s*[.):]\s*"  # "A. text", "A) text", "(A) text", "A: text"
_WRAPPED = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def strip_letter_prefixes(options: list[str]) -> list[str]:
    """Drop "A." / "A)" prefixes, but only when every option carries its own letter in order.

    An option that merely starts like one ("A. baumannii infection") is left alone.
    """
    patterns = [re.compile(_LETTER_PREFIX.format(letter=letter)) for letter in LETTERS[: len(options)]]
    if len(options) > len(LETTERS) or not all(p.match(o) for p, o in zip(patterns, options)):
        return [o.strip() for o in options]
    return [p.sub("", o, count=1).strip() for p, o in zip(patterns, options)]


def key_letter(solution: object) -> str | None:
    """The single letter of a solution like "B", " b ", "<answer> B </answer>" or "B)"; None otherwise."""
    if not isinstance(solution, str):
        return None
    wrapped = _WRAPPED.search(solution)
    text = (wrapped.group(1) if wrapped else solution).strip().rstrip(".)").lstrip("(").strip().upper()
    return text if len(text) == 1 and text in LETTERS else None


def read_test_file(path: str | Path, image_root: str | Path | None, modality_names: Mapping[str, str]) -> list[dict]:
    """The file's rows as records (image = absolute path string), in file order.

    Image paths are resolved against `image_root`, or against the JSON's folder when it is None;
    `modality_names` maps the `subset` names to the names metrics report (unlisted names are kept).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"MedVLM-R1 test file '{path}' does not exist; pass the path of MRI_CT_XRAY_300each_dataset.json "
            "(from github.com/JZPeterPan/MedVLM-R1)"
        )
    root = path.parent if image_root is None else Path(image_root).expanduser()
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise RecordError(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
    return [_record(row, index, path, root, modality_names) for index, row in enumerate(rows)]


def _record(row: dict, index: int, path: Path, root: Path, modality_names: Mapping[str, str]) -> dict:
    where = f"{path} row {index}"
    missing = [k for k in ("image", "question", "options", "solution", "subset") if k not in row]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing} (row has {sorted(row)}); "
                          "is this MedVLM-R1's test file?")
    images = [row["image"]] if isinstance(row["image"], str) else row["image"]
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
        raise RecordError(
            f"{where}: 'image' is {row['image']!r}; medvr records hold exactly one image, give one path per row"
        )
    options = row["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise RecordError(f"{where}: 'options' must be a list of strings, got {options!r}")
    options = strip_letter_prefixes(options)
    answer = key_letter(row["solution"])
    if answer is None or answer not in LETTERS[: len(options)]:
        raise RecordError(
            f"{where}: solution {row['solution']!r} is not one of the option letters {list(LETTERS[: len(options)])}; "
            "fix the row's 'solution' (a letter, or '<answer> X </answer>')"
        )
    image = Path(images[0]).expanduser()
    return {
        "id": f"{path.stem}/{index:04d}",
        "image": str(image if image.is_absolute() else root / image),
        "question": row["question"],
        "options": options,
        "answer": answer,
        "modality": modality_names.get(row["subset"], row["subset"]),
        "bbox": None,
        "question_type": None,
        "answer_type": "choice",
        "dataset": row.get("dataset") if isinstance(row.get("dataset"), str) and row.get("dataset") else None,
    }


class MedVLMR1Test:
    """Data source: MedVLM-R1's 900 evaluation items as both the val and the test split (no train split).

    Evaluation only: `data=medvlm_r1_test` has nothing to train on; to train on OmniMedVQA and test on
    this file use `experiment=medvlm_r1 data.source.test_file=<this file>`.
    """

    name = "medvlm_r1_test"

    def __init__(self, path: str, image_root: str | None, modality_names: Mapping[str, str]):
        self.path = path
        self.image_root = image_root
        self.modality_names = dict(modality_names)

    def load(self) -> datasets.DatasetDict:
        rows = records_dataset(read_test_file(self.path, self.image_root, self.modality_names))
        log.info("%s: %d items from %s", self.name, len(rows), self.path)
        return datasets.DatasetDict({"val": rows, "test": rows})
