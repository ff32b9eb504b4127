"""PMC-VQA (Zhang et al., arXiv 2305.10415) read exactly as its download unpacks, as medvr records.

Layout: DIR/train.csv and DIR/test.csv (test_clean.csv: the cleaned test subset; train_2.csv and
test_2.csv: version 2), columns `Figure_path, Question, Answer, Choice A..D, Answer_label` (some
copies add an index or `split` column), and the images in one folder (images.zip unpacks into it)
that Figure_path names a file of. Choice cells carry their own letter ("A:Lung"); Answer_label is
the key letter. The release has no val split, so val is carved from train with a fixed data seed.
"""

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import datasets

from medvr.data.medvlm_r1 import key_letter, strip_letter_prefixes
from medvr.data.omnimedvqa import carve
from medvr.data.schema import LETTERS, RecordError, records_dataset

log = logging.getLogger(__name__)

LAYOUT = ("DIR/<split>.csv (Figure_path, Question, Choice A..D, Answer_label) and DIR/<image_dir>/<Figure_path>, "
          "as the PMC-VQA download unpacks")
CHOICES = tuple(f"Choice {letter}" for letter in LETTERS[:4])
_REQUIRED = ("Figure_path", "Question", "Answer_label", "Choice A", "Choice B")
_EMPTY = ("", "nan")  # an absent choice: an empty cell, or pandas' NaN written out as text


def _cell(value: object) -> str:
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in _EMPTY else text


def read_csv(file: Path) -> list[dict]:
    """The data rows of one PMC-VQA CSV, as dicts keyed by its header, in file order."""
    if not file.is_file():
        raise FileNotFoundError(f"PMC-VQA: '{file}' does not exist; expected {LAYOUT}. Name the split's file "
                                "with data.source.files.<split>=<name>.csv (e.g. test_clean.csv, train_2.csv)")
    with open(file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in _REQUIRED if column not in (reader.fieldnames or [])]
        if missing:
            raise RecordError(f"{file}: missing column(s) {missing} (header: {reader.fieldnames}); "
                              f"expected a PMC-VQA CSV with {list(_REQUIRED)}")
        return list(reader)


def to_record(row: dict, index: int, file: Path, images: Path, modality: str) -> dict:
    """One CSV row as a record: the choices with their letters stripped, empty ones dropped last."""
    where = f"{file} row {index} (Figure_path={row.get('Figure_path')})"
    cells = [_cell(row.get(column)) for column in CHOICES]
    # an empty cell stands in as its bare letter, so it neither blocks stripping nor survives it
    texts = strip_letter_prefixes([cell or f"{letter}:" for letter, cell in zip(LETTERS, cells)])
    texts = [text if cell else "" for text, cell in zip(texts, cells)]
    key = key_letter(row.get("Answer_label"))
    if key is None or key not in LETTERS[: len(CHOICES)] or not texts[LETTERS.index(key)]:
        given = {letter: cell for letter, cell in zip(LETTERS, cells)}
        raise RecordError(f"{where}: Answer_label {row.get('Answer_label')!r} is not the letter of a non-empty "
                          f"choice among {given}; fix that row's Answer_label, or leave the row out of the file")
    kept = [k for k, text in enumerate(texts) if text]
    return {
        "id": f"{file.stem}/{index:06d}",
        "image": str(images / row["Figure_path"].strip()),
        "question": row["Question"],
        "options": [texts[k] for k in kept],
        "answer": LETTERS[kept.index(LETTERS.index(key))],
        "modality": modality,
        "bbox": None,
        "question_type": None,
        "answer_type": "choice",
        "dataset": "PMC-VQA",
    }


def _check_images(file: Path, rows: list[dict], records: list[dict]) -> None:
    for index, (row, record) in enumerate(zip(rows, records)):
        if not os.path.isfile(record["image"]):
            raise FileNotFoundError(f"{file} row {index} (Figure_path={row['Figure_path']}): image '{record['image']}' "
                                    "does not exist; unzip the image archive into data.source.image_dir, or set it "
                                    "to the folder that holds the figures")


class PMCVQA:
    """Data source over a PMC-VQA download: train and test from their CSVs, val carved from train.

    val = the first `val_size` train rows of `np.random.default_rng(seed).permutation` (see
    omnimedvqa.carve); train = the rest, in that shuffled order. Every record carries `modality`,
    since PMC-VQA names none.
    """

    name = "pmc_vqa"

    def __init__(self, path: str, files: Mapping[str, str], image_dir: str, val_size: int, seed: int, modality: str):
        self.path = Path(path).expanduser()
        self.files = dict(files)
        self.image_dir = image_dir
        self.val_size = val_size
        self.seed = seed
        self.modality = modality
        if sorted(self.files) != ["test", "train"]:
            raise ValueError(f"data.source.files={self.files}: name exactly the train and test CSVs")
        if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 1:
            raise ValueError(f"data.source.val_size={val_size!r}: expected an int >= 1 (train rows held out as val)")

    def _read(self, split: str, images: Path) -> list[dict]:
        file = self.path / self.files[split]
        rows = read_csv(file)
        if not rows:
            raise ValueError(f"PMC-VQA: {file} has no data rows, so split '{split}' would be empty; "
                             f"point data.source.files.{split} at a non-empty CSV")
        records = [to_record(row, index, file, images, self.modality) for index, row in enumerate(rows)]
        _check_images(file, rows, records)
        return records

    def load(self) -> datasets.DatasetDict:
        images = self.path / self.image_dir
        if not images.is_dir():
            present = sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
            raise FileNotFoundError(f"PMC-VQA: image folder '{images}' does not exist (folders in {self.path}: "
                                    f"{present}); unzip the image archive there or set data.source.image_dir; "
                                    f"expected {LAYOUT}")
        train, test = self._read("train", images), self._read("test", images)
        if self.val_size >= len(train):
            raise ValueError(f"PMC-VQA: data.source.val_size={self.val_size} takes all {len(train)} rows of "
                             f"{self.path / self.files['train']}, leaving split 'train' empty; lower val_size")
        chosen = carve([r["modality"] for r in train], {"val": self.val_size, "train": None}, self.seed)
        splits = {"train": [train[i] for i in chosen["train"]], "val": [train[i] for i in chosen["val"]], "test": test}
        for split, records in splits.items():
            log.info("pmc_vqa/%s: %d items", split, len(records))
        return datasets.DatasetDict({split: records_dataset(records) for split, records in splits.items()})
