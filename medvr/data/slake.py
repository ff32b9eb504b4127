"""SLAKE (Liu et al., ISBI 2021, arXiv 2102.09542) read exactly as its download unpacks, as medvr records.

Layout: DIR/train.json, DIR/validation.json (older copies: DIR/validate.json) and DIR/test.json, each a
JSON list of rows {img_id, img_name (relative to DIR/imgs/), question, answer, q_lang (en/zh), location,
modality, answer_type (OPEN/CLOSED), base_type, content_type, triple, qid}; images at
DIR/imgs/xmlab<N>/source.jpg, organ boxes at DIR/imgs/xmlab<N>/detection.json as
[{"Liver": [x, y, w, h]}, ...] in pixels. The organs become the record's named `boxes`; `bbox` is the
box of the organ the question names (None when it names none: the grounding reward then picks from `boxes`).
"""

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from medvr.data.schema import RecordError, records_dataset, strict_decoding

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# the split's file names, the first present is read (validate.json: older copies of the download)
SPLIT_FILES = {"train": ("train.json",), "val": ("validation.json", "validate.json"), "test": ("test.json",)}
ANSWER_TYPES = {"CLOSED": "closed", "OPEN": "open"}
LAYOUT = ("DIR/train.json, DIR/validation.json (or validate.json), DIR/test.json and DIR/imgs/xmlab<N>/source.jpg "
          "(+ detection.json), as the SLAKE download unpacks")
_REQUIRED = ("qid", "img_name", "question", "answer", "q_lang", "modality", "answer_type")


@dataclass(frozen=True)
class SlakeRow:
    """One native row, where it came from (for error messages) and its answer type as medvr names it."""

    file: Path
    index: int
    row: dict
    answer_type: str

    @staticmethod
    def where_of(file: Path, index: int, row: object) -> str:
        return f"{file} row {index} (qid={row.get('qid') if isinstance(row, dict) else None})"

    @property
    def where(self) -> str:
        return self.where_of(self.file, self.index, self.row)


def read_split(root: Path, split: str) -> list[SlakeRow]:
    """The rows of one split's JSON file, in file order, each checked for the fields a record needs."""
    file = next((root / name for name in SPLIT_FILES[split] if (root / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"SLAKE: no {' or '.join(SPLIT_FILES[split])} in '{root}' for split '{split}'; "
                                f"data.path must be the folder holding {LAYOUT}")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RecordError(f"{file}: not valid JSON ({err}); download the SLAKE split file again") from err
    if not isinstance(content, list):
        raise RecordError(f"{file}: expected a JSON list of SLAKE rows, got a {type(content).__name__}")
    rows = []
    for index, row in enumerate(content):
        where = SlakeRow.where_of(file, index, row)
        missing = [key for key in _REQUIRED if not isinstance(row, dict) or key not in row]
        if missing:
            raise RecordError(f"{where}: missing field(s) {missing}; expected a SLAKE row with {list(_REQUIRED)}")
        native = row["answer_type"]
        kind = ANSWER_TYPES.get(native.strip().upper()) if isinstance(native, str) else None
        if kind is None:  # checked on every row, before any filtering
            raise RecordError(f"{where}: answer_type {native!r} is unknown; SLAKE rows are one of "
                              f"{sorted(ANSWER_TYPES)}: fix the row or remove it from the file")
        rows.append(SlakeRow(file, index, row, kind))
    return rows


def organ_boxes(folder: Path, size: tuple[int, int], used_by: str) -> tuple[list[dict], int]:
    """The organ boxes of folder/detection.json as [x1, y1, x2, y2] clipped to `size`, and how many were dropped.

    A missing file means no boxes; a box with no area left after rounding and clipping is dropped.
    """
    file = folder / "detection.json"
    if not file.is_file():
        return [], 0
    fix = (f"(first used by {used_by}); expected a JSON list like [{{\"Liver\": [x, y, w, h]}}] in pixels: "
           "fix or delete it")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RecordError(f"{file}: not valid JSON ({err}) {fix}") from err
    if not isinstance(content, list) or not all(isinstance(entry, dict) for entry in content):
        raise RecordError(f"{file}: {str(content)[:80]} is not a list of {{organ: box}} objects {fix}")
    width, height = size
    boxes, dropped = [], 0
    for k, (name, box) in enumerate(item for entry in content for item in entry.items()):
        numbers = isinstance(box, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        if not (isinstance(name, str) and name.strip() and numbers and len(box) == 4):
            raise RecordError(f"{file}: box {k} {name!r}: {box!r} is not [x, y, w, h] {fix}")
        x, y, w, h = box
        x1, y1 = min(max(round(x), 0), width), min(max(round(y), 0), height)
        x2, y2 = min(max(round(x + w), 0), width), min(max(round(y + h), 0), height)
        if x2 <= x1 or y2 <= y1:
            dropped += 1
            continue
        boxes.append({"name": name.strip(), "bbox": [x1, y1, x2, y2]})
    return boxes, dropped


def named_box(question: str, boxes: list[dict]) -> list[int] | None:
    """The box of the organ the question names (whole word, any case); the longest name wins, then file order."""
    named = [box for box in boxes if re.search(rf"(?<!\w){re.escape(box['name'])}(?!\w)", question, re.IGNORECASE)]
    return max(named, key=lambda box: len(box["name"]))["bbox"] if named else None


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason}: {count}" for reason, count in counter.items() if count) or "none"


def image_size(path: Path, where: str) -> tuple[int, int]:
    """Width and height from the image header (no pixels decoded); a missing or unreadable file names its row."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image '{path}' does not exist; SLAKE keeps each image at "
                                f"DIR/imgs/<img_name>: check that the download's imgs folder unpacked completely")
    try:
        with strict_decoding(), Image.open(path) as image:
            return image.size
    except Exception as err:  # PIL raises several types for unreadable files
        raise RecordError(f"{where}: image '{path}' cannot be read ({err}); re-save it as JPEG or PNG") from err


class Slake:
    """Data source over a SLAKE download: its own train/val/test splits, filtered by language and type.

    `languages` (q_lang), `answer_types` (closed, open) and `content_types` (null: all) select rows;
    rows left out are counted per reason and logged. `sizes` per split: a count drawn with `seed`
    (kept in file order) or None for every selected row. `modality_names` renames native modalities.
    """

    name = "slake"

    def __init__(
        self,
        path: str,
        languages: Sequence[str],
        answer_types: Sequence[str],
        content_types: Sequence[str] | None,
        sizes: Mapping[str, int | None],
        seed: int,
        modality_names: Mapping[str, str],
    ):
        self.path = Path(path).expanduser().absolute()
        self.filters = {"languages": list(languages), "answer_types": list(answer_types),
                        "content_types": None if content_types is None else list(content_types)}
        self.sizes = dict(sizes)
        self.seed = seed
        self.modality_names = dict(modality_names)
        unknown = sorted(set(self.filters["answer_types"]) - set(ANSWER_TYPES.values()))
        if unknown:
            raise ValueError(f"data.source.answer_types: {unknown} are unknown; use some of "
                             f"{sorted(ANSWER_TYPES.values())}")
        if set(self.sizes) != set(SPLITS):
            raise ValueError(f"data.source.sizes has splits {sorted(self.sizes)}; give exactly {list(SPLITS)}")
        for split, size in self.sizes.items():
            if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
                raise ValueError(f"data.source.sizes.{split}={size!r}: expected an int >= 1 or null (every row)")

    def selection(self) -> str:
        """The selection as config keys, for error messages."""
        return ", ".join(f"data.source.{key}={value}" for key, value in {**self.filters, "sizes": self.sizes}.items())

    @staticmethod
    def _values(row: SlakeRow) -> dict[str, object]:
        return {"languages": row.row["q_lang"], "answer_types": row.answer_type,
                "content_types": row.row.get("content_type")}

    def _check_filters(self, rows: list[SlakeRow]) -> None:
        """A language or content type that no row has (a typo) is an error listing those present."""
        for key in ("languages", "content_types"):
            present = {self._values(row)[key] for row in rows} - {None}
            wanted = self.filters[key]
            if wanted is not None and set(wanted) - present:
                raise ValueError(f"data.source.{key}: {sorted(set(wanted) - present)} occur in no SLAKE row under "
                                 f"{self.path}; present: {sorted(present)}")

    def _select(self, split: str, rows: list[SlakeRow]) -> list[SlakeRow]:
        """The rows every filter admits, drawn down to sizes[split]; the rest are counted by reason and logged."""
        kept, left_out = [], Counter()
        for row in rows:
            values = self._values(row)
            failed = next((key for key, wanted in self.filters.items()
                           if wanted is not None and values[key] not in wanted), None)
            if failed is None:
                kept.append(row)
            else:
                left_out[f"{failed} not in {self.filters[failed]}"] += 1
        source = rows[0].file if rows else f"the {split} file"
        if not kept:
            raise ValueError(f"SLAKE: split '{split}' is empty: none of the {len(rows)} rows of {source} passes the "
                             f"filters (left out: {_counts(left_out)}); widen the selection: {self.selection()}")
        size = self.sizes[split]
        if size is not None and size > len(kept):
            raise ValueError(f"SLAKE: data.source.sizes.{split}={size}, but only {len(kept)} rows of {source} pass "
                             f"the filters; lower it or widen the selection: {self.selection()}")
        if size is not None:
            left_out[f"not drawn for data.source.sizes.{split}={size}"] = len(kept) - size
            kept = [kept[i] for i in np.sort(np.random.default_rng(self.seed).permutation(len(kept))[:size])]
        log.info("slake/%s: %d of %d rows kept; left out: %s", split, len(kept), len(rows), _counts(left_out))
        return kept

    def load(self) -> datasets.DatasetDict:
        images = self.path / "imgs"
        if not images.is_dir():
            raise FileNotFoundError(f"SLAKE: '{images}' does not exist; data.path must be the folder holding {LAYOUT}")
        native = {split: read_split(self.path, split) for split in SPLITS}
        self._check_filters([row for rows in native.values() for row in rows])
        organs: dict[str, tuple[list[dict], int]] = {}  # per image: its boxes and how many were dropped
        splits = {}
        for split, rows in native.items():
            splits[split] = []
            for row in self._select(split, rows):
                image = images / row.row["img_name"]
                if row.row["img_name"] not in organs:
                    organs[row.row["img_name"]] = organ_boxes(image.parent, image_size(image, row.where), row.where)
                splits[split].append(self.to_record(row, image, organs[row.row["img_name"]][0]))
        dropped = sum(count for _, count in organs.values())
        if dropped:
            log.info("slake: %d organ box(es) left no area inside their image after clipping and were dropped",
                     dropped)
        return datasets.DatasetDict({split: records_dataset(records) for split, records in splits.items()})

    def to_record(self, row: SlakeRow, image: Path, boxes: list[dict]) -> dict:
        """One native row as a record; the answer as text (some answers are JSON numbers)."""
        answer, question = "" if row.row["answer"] is None else str(row.row["answer"]).strip(), row.row["question"]
        if not answer:
            raise RecordError(f"{row.where}: the answer is empty; fix the row or remove it from the file")
        return {
            "id": f"slake/{row.row['qid']}",
            "image": str(image),
            "question": question,
            "options": [],
            "answer": answer,
            "modality": self.modality_names.get(row.row["modality"], row.row["modality"]),
            "bbox": named_box(question, boxes),
            "question_type": row.row.get("content_type") or None,
            "answer_type": row.answer_type,
            "boxes": boxes,
            "dataset": "SLAKE",
        }
