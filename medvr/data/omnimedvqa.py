"""OmniMedVQA (Hu et al., CVPR 2024) read exactly as its download unpacks, as medvr records.

Layout: DIR/QA_information/{Open-access,Restricted-access}/<dataset>.json, each a JSON list of rows
{question_id, question, gt_answer (the option TEXT), option_A..option_D, image_path (relative to DIR),
modality_type (`modality` in a few rows), question_type, dataset}, and the images under DIR/Images/.
The release has no train/test split, so `OmniMedVQA` filters the items and carves seeded, disjoint
splits from them (MedVLM-R1's selection is one setting of it: conf/experiment/medvlm_r1.yaml).
"""

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from medvr.data.medvlm_r1 import read_test_file
from medvr.data.schema import LETTERS, RecordError, records_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LAYOUT = ("DIR/QA_information/{Open-access,Restricted-access}/*.json (JSON lists of QA rows) and "
          "DIR/Images/<dataset>/... (the images their image_path names), as the OmniMedVQA download unpacks")
_REQUIRED = ("question_id", "question", "gt_answer", "image_path", "question_type")


@dataclass(frozen=True)
class QARow:
    """One native QA row and where it came from (for error messages and the dataset fallback)."""

    file: Path
    index: int
    row: dict

    @property
    def where(self) -> str:
        return f"{self.file} row {self.index} (question_id={self.row.get('question_id')})"

    @property
    def dataset(self) -> str:
        """The row's source dataset; rows without one are named after their QA file."""
        return self.row.get("dataset") or self.file.stem

    @property
    def modality(self) -> str:
        """The native modality name; a few rows carry it as `modality` instead of `modality_type`."""
        modality = self.row.get("modality_type", self.row.get("modality"))
        if not isinstance(modality, str):
            raise RecordError(f"{self.where}: no 'modality_type' (or 'modality') string, got {modality!r}")
        return modality


def read_rows(root: Path, access: Sequence[str]) -> list[QARow]:
    """Every QA row of the `access` folders, files sorted by name, rows in file order."""
    qa, images = root / "QA_information", root / "Images"
    for folder in (qa, images):
        if not folder.is_dir():
            raise FileNotFoundError(f"OmniMedVQA: '{folder}' does not exist; data.path must be the folder "
                                    f"holding {LAYOUT}")
    files = sorted(file for name in access if (qa / name).is_dir() for file in (qa / name).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"OmniMedVQA: no *.json in {[str(qa / name) for name in access]} "
                                f"(data.source.access={list(access)}); expected {LAYOUT}")
    rows = []
    for file in files:
        content = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(content, list):
            raise RecordError(f"{file}: expected a JSON list of QA rows, got a {type(content).__name__}")
        rows += [QARow(file, index, row) for index, row in enumerate(content)]
    return rows


def to_record(qa: QARow, root: Path, modality_names: Mapping[str, str]) -> dict:
    """One native row as a record: the options A..D that are present, in order; the key letter from gt_answer."""
    row = qa.row
    missing = [key for key in _REQUIRED if key not in row]
    if missing:
        raise RecordError(f"{qa.where}: missing field(s) {missing} (row has {sorted(row)}); "
                          "expected an OmniMedVQA QA row")
    options = [str(row[f"option_{letter}"]).strip() for letter in LETTERS if row.get(f"option_{letter}") is not None]
    key = str(row["gt_answer"]).strip()
    matches = [LETTERS[i] for i, option in enumerate(options) if option == key]
    if len(matches) != 1:
        found = "matches no option" if not matches else f"matches options {matches}"
        raise RecordError(
            f"{qa.where}: gt_answer {key!r} {found} of {options}; fix gt_answer in that file to one option's exact "
            "text, or leave its dataset out with data.source.datasets=[...]"
        )
    return {
        "id": f"{qa.dataset}/{row['question_id']}",
        "image": str(root / row["image_path"]),
        "question": row["question"],
        "options": options,
        "answer": matches[0],
        "modality": modality_names.get(qa.modality, qa.modality),
        "bbox": None,
        "question_type": row["question_type"],
        "answer_type": "choice",
        "dataset": qa.dataset,
    }


def carve(modalities: Sequence[str], sizes: Mapping[str, object], seed: int) -> dict[str, list[int]]:
    """Disjoint splits of item indices (items in pool order), drawn from seeded shuffles.

    Sized splits are carved first, in the order train, val, test: an int takes the next unused items
    of a shuffle of all items; a {modality: count} mapping takes, per modality, the next unused items
    of a shuffle of that modality's items alone (so adding other modalities to the pool does not
    change it). Both shuffles are `np.random.default_rng(seed).permutation`, the one HF datasets'
    `Dataset.shuffle(seed)` applies. A split of size None then takes every item left, in shuffled
    order. Raises when a count exceeds the items left, naming the split and modality.
    """
    modality = np.asarray(modalities, dtype=object)
    everything = np.random.default_rng(seed).permutation(len(modality))
    per_modality = {}
    for name in set(modalities):
        members = np.flatnonzero(modality == name)
        per_modality[name] = members[np.random.default_rng(seed).permutation(len(members))]
    free = np.ones(len(modality), dtype=bool)
    out: dict[str, list[int]] = {}
    for split in (s for s in SPLITS if s in sizes and sizes[s] is not None):
        wants = sizes[split].items() if isinstance(sizes[split], Mapping) else [(None, sizes[split])]
        out[split] = []
        for name, count in wants:
            order = everything if name is None else per_modality.get(name, np.array([], dtype=int))
            left = order[free[order]]
            if len(left) < count:
                of = "" if name is None else f" of modality '{name}'"
                raise ValueError(f"sizes.{split} asks for {count} items{of}, but only {len(left)} are left "
                                 f"(items per modality: {dict(sorted(Counter(modalities).items()))})")
            free[left[:count]] = False
            out[split] += left[:count].tolist()
    for split in (s for s in SPLITS if s in sizes and sizes[s] is None):
        out[split] = everything[free[everything]].tolist()
    return out


class OmniMedVQA:
    """Data source over an OmniMedVQA download: filter by modality, dataset and question type, then carve.

    `modalities` match native or renamed names; `modality_names` renames native modalities in the
    records (MRI, CT, X-ray, ...) so per-modality metrics read well. `sizes` per split: a count, a
    {modality: count} mapping or None (every item left); see `carve`. `test_file` (MedVLM-R1's
    900-item JSON) replaces the carved test split; pool items that share an image file name and
    question with it are left out of train and val.

    MedVLM-R1's selection (experiment=medvlm_r1): the pool is the MRI, CT and X-ray items (QA files
    sorted by name, rows in file order); train = the first 600 of the MRI items permuted by
    `np.random.default_rng(42).permutation`, val = the next 60, test = the next 300 MRI items and
    the first 300 CT and 300 X-ray items of their own permutations (or the rows of `test_file`).
    """

    name = "omnimedvqa"

    def __init__(
        self,
        path: str,
        access: Sequence[str],
        modalities: Sequence[str] | None,
        datasets: Sequence[str] | None,
        question_types: Sequence[str] | None,
        sizes: Mapping[str, int | Mapping[str, int] | None],
        seed: int,
        modality_names: Mapping[str, str],
        test_file: str | None,
        test_image_root: str | None,
    ):
        self.path = Path(path).expanduser()
        self.access = list(access)
        wanted = {"modalities": modalities, "datasets": datasets, "question_types": question_types}
        self.filters = {key: None if value is None else list(value) for key, value in wanted.items()}
        self.sizes = {split: dict(size) if isinstance(size, Mapping) else size for split, size in sizes.items()}
        self.seed = seed
        self.modality_names = dict(modality_names)
        self.test_file = test_file
        self.test_image_root = test_image_root
        self._check_sizes()

    def _carved_sizes(self) -> dict:
        return {split: size for split, size in self.sizes.items() if not (split == "test" and self.test_file)}

    def _check_sizes(self) -> None:
        unknown = sorted(set(self.sizes) - set(SPLITS))
        if unknown or not set(SPLITS) <= set(self.sizes):
            raise ValueError(f"data.source.sizes has splits {sorted(self.sizes)}; give exactly {list(SPLITS)}")
        for split, size in self.sizes.items():
            counts = size.values() if isinstance(size, dict) else [size]
            if size is not None and not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
                raise ValueError(f"data.source.sizes.{split}={size!r}: expected an int >= 1, a mapping "
                                 "{modality: int >= 1}, or null (every item left)")
        if sum(size is None for size in self._carved_sizes().values()) > 1:
            raise ValueError(f"data.source.sizes={self.sizes}: at most one split may be null (every item left)")

    def selection(self) -> str:
        """The selection as config keys, for error messages."""
        return ", ".join(f"data.source.{key}={value}" for key, value in
                         {**self.filters, "sizes": self.sizes, "seed": self.seed}.items())

    def _values(self, qa: QARow) -> dict[str, set]:
        """What the filters compare: modality by native or renamed name, dataset, question type."""
        modality = qa.modality
        return {"modalities": {modality, self.modality_names.get(modality, modality)},
                "datasets": {qa.dataset}, "question_types": {qa.row.get("question_type")}}

    def _filter(self, rows: list[QARow]) -> list[QARow]:
        """The rows every filter admits; a filter value that no row has (a typo) is an error listing those present."""
        values = [self._values(qa) for qa in rows]
        for key, wanted in self.filters.items():
            present = set().union(*(v[key] for v in values)) - {None}
            if wanted is not None and set(wanted) - present:
                raise ValueError(f"data.source.{key}: {sorted(set(wanted) - present)} occur in no QA row under "
                                 f"{self.path}; present: {sorted(present)}")
        return [qa for qa, v in zip(rows, values)
                if all(wanted is None or v[key] & set(wanted) for key, wanted in self.filters.items())]

    def load(self) -> datasets.DatasetDict:
        pool = self._filter(read_rows(self.path, self.access))
        records = [to_record(qa, self.path, self.modality_names) for qa in pool]
        splits: dict[str, list[dict]] = {}
        if self.test_file:
            splits["test"] = read_test_file(self.test_file, self.test_image_root, self.modality_names)
            held_out = {_identity(r) for r in splits["test"]}
            keep = [i for i, r in enumerate(records) if _identity(r) not in held_out]
            log.info("omnimedvqa: %d item(s) also in %s left out of train/val",
                     len(records) - len(keep), self.test_file)
            pool, records = [pool[i] for i in keep], [records[i] for i in keep]
        try:
            chosen = carve([r["modality"] for r in records], self._carved_sizes(), self.seed)
        except ValueError as err:
            raise ValueError(f"OmniMedVQA at {self.path}: {err}; selection: {self.selection()}") from None
        for split, indices in chosen.items():
            if not indices:
                raise ValueError(f"OmniMedVQA at {self.path}: split '{split}' is empty ({len(records)} items match the "
                                 f"filters, all taken by the other splits); widen the selection: {self.selection()}")
            _check_images([pool[i] for i in indices], [records[i] for i in indices])
            splits[split] = [records[i] for i in indices]
        for split in SPLITS:
            counts = Counter(r["modality"] for r in splits[split])
            log.info("omnimedvqa/%s: %d items %s", split, len(splits[split]), dict(sorted(counts.items())))
        return datasets.DatasetDict({s: records_dataset(splits[s]) for s in SPLITS})


def _identity(record: dict) -> tuple[str, str]:
    """How an OmniMedVQA item is recognised in MedVLM-R1's test file: image file name and question."""
    return os.path.basename(record["image"]), record["question"].strip()


def _check_images(rows: list[QARow], records: list[dict]) -> None:
    """A selected item whose image is absent: name its QA row, since Restricted-access images are not public."""
    for qa, record in zip(rows, records):
        if not os.path.isfile(record["image"]):
            raise FileNotFoundError(
                f"{qa.where}: image '{record['image']}' does not exist. Restricted-access datasets ship without "
                "images (get them from their original sources); read Open-access only with "
                "data.source.access=[Open-access], or leave the dataset out with data.source.datasets=[...]"
            )
