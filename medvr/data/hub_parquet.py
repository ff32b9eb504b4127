"""Free-text VQA sets (closed yes/no and open questions) in the hub's parquet layout, and their selection.

flaviagiammarino's hub copies of VQA-RAD and PathVQA unpack to DIR/data/<split>-*.parquet with the
columns image ({bytes, path}), question and answer; a yes/no answer marks a closed question. Both
sources (medvr/data/vqa_rad.py, medvr/data/path_vqa.py) share the selection here: a seeded val carve
where the download has no validation split, an answer-type filter and per-split limits.
"""

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq

from medvr.data.schema import RecordError, records_dataset

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# medvr split -> the hub's file prefix
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
COLUMNS = ("image", "question", "answer")
TEXT_TYPES = ("closed", "open")

# (where the row is, for errors; the record)
Item = tuple[str, dict]


def yes_no_type(answer: str) -> str:
    """closed for a yes/no answer (any case, padded), open for anything else."""
    return "closed" if answer.strip().lower() in ("yes", "no") else "open"


def hub_files(root: Path, split: str) -> list[Path]:
    """The parquet files of medvr split `split` in the hub layout, sorted by name (their row order)."""
    return sorted((root / "data").glob(f"{HUB_SPLITS[split]}-*.parquet"))


def read_hub_parquet(root: Path, prefix: str, modality: str, dataset: str, layout: str) -> dict[str, list[Item]]:
    """Every row of the hub's parquet files as records, per medvr split present (val only if shipped).

    Ids are "<prefix>/<hub split>/<row>", rows numbered across the split's files in name order.
    """
    found = {split: hub_files(root, split) for split in SPLITS}
    missing = [HUB_SPLITS[split] for split in ("train", "test") if not found[split]]
    if missing:
        raise FileNotFoundError(f"{root / 'data'}: no {missing} parquet files; expected {layout}")
    out = {}
    for split, files in ((split, files) for split, files in found.items() if files):
        native, items = HUB_SPLITS[split], []
        for file in files:
            names = pq.read_schema(file).names
            if set(COLUMNS) - set(names):
                raise ValueError(f"{file}: no column(s) {sorted(set(COLUMNS) - set(names))} (it has {names}); "
                                 f"expected {layout}")
            for offset, row in enumerate(pq.read_table(file, columns=list(COLUMNS)).to_pylist()):
                index = len(items)
                where = f"{file} row {offset} (id={prefix}/{native}/{index:05d})"
                items.append((where, _hub_record(row, f"{prefix}/{native}/{index:05d}", modality, dataset, where)))
        out[split] = items
    return out


def _hub_record(row: dict, id_: str, modality: str, dataset: str, where: str) -> dict:
    image, answer = row["image"], row["answer"]
    if not isinstance(image, dict) or image.get("bytes") is None:
        raise RecordError(f"{where}: 'image' holds no bytes ({type(image).__name__}); re-download that file")
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError(f"{where}: answer {answer!r} is not a non-empty text; re-download that file")
    return {"id": id_, "image": {"bytes": image["bytes"], "path": image.get("path")}, "question": row["question"],
            "options": [], "answer": answer.strip(), "modality": modality, "bbox": None, "question_type": None,
            "answer_type": yes_no_type(answer), "dataset": dataset}


class TextAnswerSource:
    """Selection shared by the closed/open sources; a subclass sets `name` and reads `native()`.

    `val_size` items are carved from the native train split with `np.random.default_rng(seed)
    .permutation` (the shuffle HF's `Dataset.shuffle(seed)` applies) before the answer-type filter, so
    the train/val partition does not depend on the filter; a shipped validation split is used instead.
    `limits` then keep, per split, at most that many items, a seeded sample (null: all), in native order.
    """

    name = "text_answers"

    def __init__(self, path: str, modality: str, answer_types: Sequence[str], val_size: int,
                 limits: Mapping[str, int | None], seed: int):
        self.path = Path(path).expanduser()
        self.modality = modality
        self.answer_types = list(answer_types)
        self.val_size = val_size
        self.limits = dict(limits)
        self.seed = seed
        unknown = sorted(set(self.answer_types) - set(TEXT_TYPES))
        if unknown or not self.answer_types:
            raise ValueError(f"data.source.answer_types={self.answer_types}: give a non-empty subset of "
                             f"{list(TEXT_TYPES)}")
        if sorted(self.limits) != sorted(SPLITS):
            raise ValueError(f"data.source.limits has splits {sorted(self.limits)}; give exactly {list(SPLITS)}")
        for key, value in [("val_size", val_size), *((f"limits.{s}", n) for s, n in self.limits.items())]:
            if (value is not None or key == "val_size") and not (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"data.source.{key}={value!r}: expected an int >= 1"
                                 + ("" if key == "val_size" else ", or null (every item)"))

    def native(self) -> dict[str, list[Item]]:
        """The download's rows as (where, record) per medvr split; val may be absent (then it is carved)."""
        raise NotImplementedError

    def selection(self) -> str:
        """The selection as config keys, for error messages."""
        return (f"data.source.answer_types={self.answer_types}, data.source.val_size={self.val_size}, "
                f"data.source.limits={self.limits}, data.source.seed={self.seed}")

    def load(self) -> datasets.DatasetDict:
        splits = self.native()
        if "val" in splits:
            log.info("%s: the download has a validation split; data.source.val_size is not used", self.name)
        else:
            splits = {**splits, **self._carve(splits["train"])}
        out = {}
        for split in SPLITS:
            kept = [(where, r) for where, r in splits[split] if r["answer_type"] in self.answer_types]
            left_out = Counter(r["answer_type"] for _, r in splits[split] if r["answer_type"] not in self.answer_types)
            if left_out:
                log.info("%s/%s: %d item(s) left out by data.source.answer_types=%s: %s", self.name, split,
                         left_out.total(), self.answer_types, dict(sorted(left_out.items())))
            kept = self._sample(kept, split)
            if not kept:
                raise ValueError(f"{self.name} at {self.path}: split '{split}' is empty after selection "
                                 f"({len(splits[split])} items before it); widen it: {self.selection()}")
            _check_image_files(kept)
            counts = Counter(record["answer_type"] for _, record in kept)
            log.info("%s/%s: %d items %s", self.name, split, len(kept), dict(sorted(counts.items())))
            out[split] = records_dataset([record for _, record in kept])
        return datasets.DatasetDict(out)

    def _carve(self, train: list[Item]) -> dict[str, list[Item]]:
        if self.val_size >= len(train):
            raise ValueError(f"{self.name} at {self.path}: data.source.val_size={self.val_size} leaves nothing of the "
                             f"{len(train)} train items to train on; lower it")
        val = np.zeros(len(train), dtype=bool)
        val[np.random.default_rng(self.seed).permutation(len(train))[: self.val_size]] = True
        return {"train": [item for item, v in zip(train, val) if not v],
                "val": [item for item, v in zip(train, val) if v]}

    def _sample(self, items: list[Item], split: str) -> list[Item]:
        limit = self.limits[split]
        if limit is None or limit >= len(items):
            if limit is not None:
                log.info("%s/%s: data.source.limits.%s=%d, but only %d items match; keeping all", self.name, split,
                         split, limit, len(items))
            return items
        chosen = np.sort(np.random.default_rng(self.seed).permutation(len(items))[:limit])
        return [items[i] for i in chosen]


def _check_image_files(items: list[Item]) -> None:
    """A selected row whose image file is absent, named before any image is decoded."""
    for where, record in items:
        image = record["image"]
        if isinstance(image, str) and not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image '{image}' does not exist; restore it from the download's "
                                    "image folder (data.path must be the folder the download unpacked to)")
