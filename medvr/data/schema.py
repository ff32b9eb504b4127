"""The one record schema shared by every medvr dataset (synthetic or real), and its checks.

Bad rows fail before training starts, with an error that names the dataset, split, row and id.
"""

import io
import os
from typing import Any, Protocol

import datasets
import numpy as np
from PIL import Image

LETTERS = "ABCDE"
MIN_OPTIONS, MAX_OPTIONS = 2, 5

# A record is a plain dict with exactly these fields; bbox is [x1, y1, x2, y2] in pixels or None.
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "options": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "modality": datasets.Value("string"),
        "bbox": datasets.List(datasets.Value("int32")),
    }
)
FIELDS = tuple(FEATURES)


class RecordError(ValueError):
    """A dataset row that does not follow the record schema."""


class VQASource(Protocol):
    """What VQADataModule needs from a data source."""

    name: str

    def load(self) -> datasets.DatasetDict: ...


def _open_image(value: Any, where: str) -> Image.Image:
    """Open an image given as PIL image, file path or datasets' undecoded {'bytes', 'path'} dict.

    Only the header is read here (PIL opens lazily); pixels are decoded on first access.
    """
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        source = io.BytesIO(value["bytes"])
    elif isinstance(value, dict) and value.get("path"):
        source = value["path"]
    elif isinstance(value, (str, os.PathLike)):
        source = value
    else:
        raise RecordError(
            f"{where}: 'image' is {type(value).__name__}, expected a PIL image or a file path; "
            "store images with datasets.Image() or as paths to image files"
        )
    if not isinstance(source, io.BytesIO) and not os.path.isfile(source):
        raise RecordError(
            f"{where}: image file '{source}' does not exist; fix the path in the dataset "
            "(relative paths are resolved against the dataset directory)"
        )
    try:
        return Image.open(source)
    except Exception as err:  # PIL raises several types for unreadable files
        raise RecordError(f"{where}: image cannot be read ({err}); re-save it as PNG or JPEG") from err


def _normalise_mode(image: Image.Image) -> Image.Image:
    """Decode pixels into 8-bit grayscale ('L') or 'RGB', the two modes processors accept."""
    if image.mode in ("L", "RGB"):
        image.load()
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth scans (common in medicine): stretch to 0..255 instead of clipping.
        pixels = np.asarray(image, dtype=np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) * (255.0 / max(high - low, 1e-6))
        return Image.fromarray(pixels.astype(np.uint8), mode="L")
    if image.mode in ("1", "LA"):
        return image.convert("L")
    return image.convert("RGB")


def _check_bbox(bbox: Any, size: tuple[int, int], where: str) -> list[int] | None:
    if bbox is None:
        return None
    width, height = size
    values = list(bbox) if isinstance(bbox, (list, tuple, np.ndarray)) else None
    if (
        values is None
        or len(values) != 4
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
    ):
        raise RecordError(
            f"{where}: bbox {bbox!r} must be 4 integers [x1, y1, x2, y2] in pixels, or None"
        )
    x1, y1, x2, y2 = (int(v) for v in values)
    if x2 <= x1 or y2 <= y1:
        raise RecordError(f"{where}: bbox {values} has zero area; it needs x1 < x2 and y1 < y2")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise RecordError(
            f"{where}: bbox {values} lies outside the {width}x{height} image; "
            "boxes are pixel coordinates of the stored image, not normalised ones"
        )
    return [x1, y1, x2, y2]


def validate_record(record: dict, where: str, decode_image: bool = True) -> dict:
    """Check one row against the schema and return it normalised (a new dict of the schema fields).

    `where` names the row in errors, e.g. "synthetic/train row 12 (id=syn-train-00012)".
    With decode_image=False only the image header is read (a cheap up-front pass) and the image
    value is returned as given; otherwise it is returned as a decoded 'L' or 'RGB' PIL image.
    """
    missing = [field for field in FIELDS if field not in record and field != "bbox"]
    if missing:
        raise RecordError(
            f"{where}: missing field(s) {missing} (row has {sorted(record)}); rename the dataset "
            "columns to the schema, e.g. data.source.columns.question=<column>"
        )
    if record["image"] is None:
        raise RecordError(f"{where}: 'image' is empty; every row needs an image")
    image = _open_image(record["image"], where)
    for field in ("question", "modality"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise RecordError(f"{where}: '{field}' must be a non-empty string, got {record[field]!r}")
    if not isinstance(record["id"], (str, int, np.integer)):
        raise RecordError(f"{where}: 'id' must be a string or integer, got {record['id']!r}")

    options = record["options"]
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise RecordError(f"{where}: 'options' must be a list of strings, got {options!r}")
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise RecordError(
            f"{where}: {len(options)} options, but a question needs {MIN_OPTIONS} to "
            f"{MAX_OPTIONS} (letters {LETTERS}); drop or merge options"
        )
    answer = record["answer"].strip().upper() if isinstance(record["answer"], str) else None
    if answer is None or len(answer) != 1 or answer not in LETTERS[: len(options)]:
        raise RecordError(
            f"{where}: answer {record['answer']!r} is not one of the option letters "
            f"{list(LETTERS[: len(options)])}; store the letter of the correct option, not its text"
        )
    bbox = _check_bbox(record.get("bbox"), image.size, where)

    if decode_image:
        try:
            image = _normalise_mode(image)
        except Exception as err:
            raise RecordError(f"{where}: image cannot be decoded ({err}); re-save it") from err
    elif image is not record["image"]:
        image.close()  # opened here only to read the header
    return {
        "id": str(record["id"]),
        "image": image if decode_image else record["image"],
        "question": record["question"],
        "options": list(options),
        "answer": answer,
        "modality": record["modality"],
        "bbox": bbox,
    }


def validate_dataset(dataset: datasets.DatasetDict, name: str, batch_size: int = 256) -> None:
    """Check every row of every split without decoding pixels; raise RecordError on the first bad row."""
    for split, rows in dataset.items():
        if isinstance(rows.features.get("image"), datasets.Image):
            rows = rows.cast_column("image", datasets.Image(decode=False))
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            for offset, values in enumerate(zip(*batch.values())):
                record = dict(zip(batch, values))
                where = f"{name}/{split} row {start + offset} (id={record.get('id')})"
                validate_record(record, where, decode_image=False)
