"""MedXpertQA MM (Zuo et al., ICML 2025, arXiv 2501.18362) read as its download unpacks, as medvr records.

Layout: DIR/MM/test.jsonl (and DIR/MM/dev.jsonl, a few items), one JSON object a line: `id`, `question`
(ending in "Answer Choices: (A) ... (E) ..."), `options` {"A": ..., "E": ...}, `label` (the key letter),
`images` (a LIST of file names in DIR/images/, where images.zip unpacks), `medical_task`,
`body_system` and `question_type` (Reasoning / Understanding). Questions may have several images:
the first is the record's `image`, the others its `extra_images`, in order.
"""

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets

from medvr.data.omnimedvqa import carve
from medvr.data.schema import LETTERS, RecordError, records_dataset

log = logging.getLogger(__name__)

LAYOUT = ("DIR/MM/test.jsonl (and DIR/MM/dev.jsonl) with one question a line, and DIR/<image_dir>/ holding the "
          "files their `images` name, as the MedXpertQA download unpacks (unzip images.zip in DIR)")
_REQUIRED = ("id", "question", "options", "label", "images")
_CHOICES_BLOCK = "Answer Choices:"


def read_jsonl(file: Path) -> list[dict]:
    """The rows of one jsonl file, in file order; blank lines are skipped, row numbers count from 0."""
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RecordError(f"{file} line {number + 1}: not a JSON object ({err}); fix or remove that line") from err
    return rows


def strip_choices(question: str) -> str | None:
    """The question without its trailing "Answer Choices: (A) ..." block; None when it has none."""
    start = question.rfind(_CHOICES_BLOCK)
    if start < 0 or not question[start + len(_CHOICES_BLOCK):].lstrip().startswith("(A)"):
        return None
    return question[:start].rstrip() or None


def to_record(row: dict, where: str, images: Path, modality: str, strip: bool) -> tuple[dict, bool]:
    """One native row as a record, and whether an answer-choices block was stripped from its question."""
    missing = [key for key in _REQUIRED if key not in row]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing} (row has {sorted(row)}); expected a MedXpertQA MM row")
    options = row["options"]
    letters = sorted(options) if isinstance(options, dict) else []
    if not letters or letters != list(LETTERS[: len(letters)]) or not all(
            isinstance(options[k], str) and options[k].strip() for k in letters):
        raise RecordError(f"{where}: options {options!r} must map the letters A.. ({LETTERS}) in order to non-empty "
                          "texts; MedXpertQA Text (10 options) is not a multimodal set, read MM/")
    label = row["label"].strip().upper() if isinstance(row["label"], str) else row["label"]
    if label not in letters:
        raise RecordError(f"{where}: label {row['label']!r} is not one of the option letters {letters}; "
                          "fix that row's label")
    names = [row["images"]] if isinstance(row["images"], str) else row["images"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise RecordError(f"{where}: images {row['images']!r} must be a non-empty list of file names")
    paths = [str(images / name.strip()) for name in names]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image '{path}' does not exist; unzip images.zip in data.path, "
                                    "or set data.source.image_dir to the folder that holds the images")
    stripped = strip_choices(row["question"]) if strip and isinstance(row["question"], str) else None
    native_modality = row.get("modality")
    return {
        "id": str(row["id"]),
        "image": paths[0],
        "question": row["question"] if stripped is None else stripped,
        "options": [options[k].strip() for k in letters],
        "answer": label,
        "modality": native_modality if isinstance(native_modality, str) and native_modality else modality,
        "bbox": None,
        "question_type": row.get("question_type"),
        "answer_type": "choice",
        "extra_images": paths[1:],
        "dataset": "MedXpertQA-MM",
    }, stripped is not None


class MedXpertQAMM:
    """Data source: MedXpertQA MM as val and test splits only (evaluation only, no train split).

    MedXpertQA is a benchmark with no training items, so, like MedVLMR1Test, this source serves
    evaluation (`eval.py data=medxpertqa_mm`, or as a further test set) and returns no train split.
    test = every selected row of MM/test.jsonl, never cut, so scores compare with published ones.
    val = MM/dev.jsonl when present; otherwise `val_size` test rows drawn with
    `np.random.default_rng(seed).permutation` (see omnimedvqa.carve) and left in test too.
    `question_types` keeps only those types (Reasoning, Understanding); the rest are counted and logged.
    """

    name = "medxpertqa_mm"

    def __init__(self, path: str, image_dir: str, strip_choices_from_question: bool,
                 question_types: Sequence[str] | None, val_size: int, seed: int, modality: str):
        self.path = Path(path).expanduser()
        self.image_dir = image_dir
        self.strip = strip_choices_from_question
        self.question_types = None if question_types is None else list(question_types)
        self.val_size = val_size
        self.seed = seed
        self.modality = modality
        if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 1:
            raise ValueError(f"data.source.val_size={val_size!r}: expected an int >= 1 (test rows drawn as val "
                             "when MM/dev.jsonl is absent)")

    def _records(self, split: str, file: Path, rows: list[dict], images: Path) -> list[dict]:
        """The records of the rows the selection keeps; dropped rows and stripped questions are logged."""
        kept = [(i, row) for i, row in enumerate(rows)
                if self.question_types is None or row.get("question_type") in self.question_types]
        done = [to_record(row, f"{file} row {i} (id={row.get('id')})", images, self.modality, self.strip)
                for i, row in kept]
        log.info("medxpertqa_mm/%s: %s: %d rows, %d left out by data.source.question_types=%s; %d of %d questions "
                 "had their trailing '%s' block stripped", split, file, len(rows), len(rows) - len(kept),
                 self.question_types, sum(stripped for _, stripped in done), len(done), _CHOICES_BLOCK)
        if not done:
            raise ValueError(f"MedXpertQA: split '{split}' is empty: no row of {file} is left after the selection "
                             f"data.source.question_types={self.question_types}; widen it")
        return [record for record, _ in done]

    def load(self) -> datasets.DatasetDict:
        test_file, dev_file = self.path / "MM" / "test.jsonl", self.path / "MM" / "dev.jsonl"
        images = self.path / self.image_dir
        for needed, present in ((test_file, test_file.is_file()), (images, images.is_dir())):
            if not present:
                raise FileNotFoundError(f"MedXpertQA: '{needed}' does not exist; data.path must be the folder "
                                        f"holding {LAYOUT} (image folder: data.source.image_dir)")
        files = {"test": test_file, **({"val": dev_file} if dev_file.is_file() else {})}
        rows = {split: read_jsonl(file) for split, file in files.items()}
        types = {row.get("question_type") for split_rows in rows.values() for row in split_rows}
        if self.question_types is not None and set(self.question_types) - types:
            raise ValueError(f"data.source.question_types: {sorted(set(self.question_types) - types)} occur in no "
                             f"row of {sorted(map(str, files.values()))}; present: {sorted(map(str, types - {None}))}")
        splits = {split: self._records(split, files[split], rows[split], images) for split in files}
        if "val" not in splits:
            test = splits["test"]
            if self.val_size > len(test):
                raise ValueError(f"MedXpertQA: no {dev_file}, and data.source.val_size={self.val_size} exceeds the "
                                 f"{len(test)} selected test rows; lower val_size")
            splits["val"] = [test[i] for i in carve([r["modality"] for r in test], {"val": self.val_size},
                                                    self.seed)["val"]]
            log.info("medxpertqa_mm: no %s; val = %d test rows drawn with seed %d", dev_file, self.val_size, self.seed)
        for split, records in splits.items():
            counts = Counter(r["question_type"] for r in records)
            log.info("medxpertqa_mm/%s: %d items %s", split, len(records), dict(sorted(counts.items(), key=str)))
        return datasets.DatasetDict({split: records_dataset(splits[split]) for split in ("val", "test")})
