"""VQA-RAD (Lau et al., Scientific Data 2018) read as either of its downloads unpacks, as medvr records.

The hub copy (flaviagiammarino/vqa-rad) is DIR/data/{train,test}-*.parquet: image, question and
answer only, so a yes/no answer marks a closed question. The original OSF release is
DIR/"VQA_RAD Dataset Public.json", a list of rows {qid, image_name, image_organ, question, answer,
answer_type (CLOSED/OPEN), question_type, phrase_type}, with the images in DIR/"VQA_RAD Image Folder"/;
its test rows are those whose phrase_type starts with "test". Neither names a modality per image.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from medvr.data.hub_parquet import Item, TextAnswerSource, hub_files, read_hub_parquet
from medvr.data.schema import RecordError

JSON_FILE = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
PARQUET_LAYOUT = "DIR/data/train-*.parquet and DIR/data/test-*.parquet (image, question, answer), as the hub copy"
JSON_LAYOUT = f"DIR/{JSON_FILE} and DIR/{IMAGE_FOLDER}/, as the OSF release unpacks"
LAYOUTS = ("parquet", "json")
_ANSWER_TYPES = {"CLOSED": "closed", "OPEN": "open"}
_REQUIRED = ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")


class VQARAD(TextAnswerSource):
    """Data source over a VQA-RAD download; `layout` (parquet | json | None: detect) picks the reader.

    Records: id "vqa_rad/<hub split>/<row>" (parquet) or "vqa_rad/<qid>" (json), modality `modality`,
    question_type the release's (json; None in the parquet copy), dataset "VQA-RAD".
    """

    name = "vqa_rad"

    def __init__(self, path: str, layout: str | None, modality: str, answer_types: Sequence[str], val_size: int,
                 limits: Mapping[str, int | None], seed: int):
        super().__init__(path, modality, answer_types, val_size, limits, seed)
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"data.source.layout={layout!r}: use one of {list(LAYOUTS)}, or null to detect it")
        self.layout = layout

    def detect(self) -> str:
        """The layout data.path holds, or the configured one."""
        if self.layout is not None:
            return self.layout
        found = {"parquet": bool(hub_files(self.path, "train") or hub_files(self.path, "test")),
                 "json": (self.path / JSON_FILE).is_file()}
        present = [layout for layout, there in found.items() if there]
        if not present:
            raise FileNotFoundError(f"VQA-RAD: '{self.path}' holds neither layout; data.path must be the folder "
                                    f"holding {PARQUET_LAYOUT}, or {JSON_LAYOUT}")
        if len(present) > 1:
            raise ValueError(f"VQA-RAD: '{self.path}' holds both the parquet and the JSON layout; choose one with "
                             "data.source.layout=parquet or data.source.layout=json")
        return present[0]

    def native(self) -> dict[str, list[Item]]:
        if self.detect() == "parquet":
            return read_hub_parquet(self.path, "vqa_rad", self.modality, "VQA-RAD", PARQUET_LAYOUT)
        return read_json(self.path, self.modality)


def read_json(root: Path, modality: str) -> dict[str, list[Item]]:
    """The OSF release's rows as records, train and test, in file order."""
    file, images = root / JSON_FILE, root / IMAGE_FOLDER
    for path in (file, images):
        if not path.exists():
            raise FileNotFoundError(f"VQA-RAD: '{path}' does not exist; data.path must be the folder holding "
                                    f"{JSON_LAYOUT}")
    rows = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise RecordError(f"{file}: expected a JSON list of QA rows, got a {type(rows).__name__}")
    out: dict[str, list[Item]] = {"train": [], "test": []}
    for index, row in enumerate(rows):
        where = f"{file} row {index} (qid={row.get('qid') if isinstance(row, dict) else None})"
        split, record = _json_record(row, images, modality, where)
        out[split].append((where, record))
    return out


def _json_record(row: dict, images: Path, modality: str, where: str) -> tuple[str, dict]:
    missing = [key for key in _REQUIRED if not isinstance(row, dict) or row.get(key) is None]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing}; expected a VQA-RAD QA row with {list(_REQUIRED)}")
    answer_type = _ANSWER_TYPES.get(str(row["answer_type"]).strip().upper())
    if answer_type is None:
        raise RecordError(f"{where}: answer_type {row['answer_type']!r} is neither CLOSED nor OPEN; fix it in that "
                          "file")
    answer = str(row["answer"]).strip()  # a few answers are JSON numbers
    if not answer:
        raise RecordError(f"{where}: the answer is empty; fix it in that file")
    question_type = str(row.get("question_type") or "").strip() or None
    split = "test" if str(row["phrase_type"]).strip().lower().startswith("test") else "train"
    return split, {"id": f"vqa_rad/{row['qid']}", "image": str(images / str(row["image_name"]).strip()),
                   "question": row["question"], "options": [], "answer": answer, "modality": modality,
                   "bbox": None, "question_type": question_type, "answer_type": answer_type, "dataset": "VQA-RAD"}
