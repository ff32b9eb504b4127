"""The one record schema shared by every medvr dataset (synthetic or real), and its checks.

Bad rows fail before training starts, with an error that names the dataset, split, row and id:
every image is decoded in full once, since a truncated file passes a header-only check.
"""

import contextlib
import io
import logging
import os
import time
import warnings
from typing import Any, Protocol

import datasets
import numpy as np
from PIL import Image, ImageFile

log = logging.getLogger(__name__)

LETTERS = "ABCDE"
MIN_OPTIONS, MAX_OPTIONS = 2, 5
# choice: lettered options, the answer is the key letter; closed: yes/no (or a closed word list, as in
# SLAKE), open: free text; closed and open questions have no options and the answer is the text
ANSWER_TYPES = ("choice", "closed", "open")

# A record is a plain dict with exactly these fields. Boxes are [x1, y1, x2, y2] in pixels of `image`.
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "options": datasets.List(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "modality": datasets.Value("string"),
        # the box the question is about (grounding reward, consensus-to-truth monitor), or None
        "bbox": datasets.List(datasets.Value("int32")),
        "question_type": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        # further images of a multi-image question (MedXpertQA), shown after `image`, in order
        "extra_images": datasets.List(datasets.Image()),
        # named ground-truth boxes of `image` (SLAKE's organs): [{"name": "Liver", "bbox": [...]}]
        "boxes": datasets.List({"name": datasets.Value("string"), "bbox": datasets.List(datasets.Value("int32"))}),
        # the source dataset of the row (OmniMedVQA's sub-datasets), for per-dataset reading
        "dataset": datasets.Value("string"),
    }
)
FIELDS = tuple(FEATURES)
# fields a dataset may lack (None): the question's box, its type (per-type accuracy), its answer type
# (None: choice), further images, named boxes, source dataset
OPTIONAL_FIELDS = ("bbox", "question_type", "answer_type", "extra_images", "boxes", "dataset")
# Part of the key of cached "dataset passed" verdicts: bump whenever the checks below change.
VALIDATION_VERSION = 3
# Above this many pixels an image is refused rather than decoded (a 1-gigapixel RGB scan takes
# 3 GB); PIL's own decompression-bomb limit (~89 MP) is lifted while medvr checks sizes itself.
DECODE_PIXEL_CEILING = 1_000_000_000
_PROGRESS_SECONDS = 10.0


class RecordError(ValueError):
    """A dataset row that does not follow the record schema."""


def records_dataset(records: list[dict]) -> datasets.Dataset:
    """A datasets.Dataset of records in the schema's features; absent optional fields become None."""
    columns = {field: [record.get(field) for record in records] for field in FIELDS}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


class VQASource(Protocol):
    """What VQADataModule needs from a data source."""

    name: str

    def load(self) -> datasets.DatasetDict: ...


def _image_label(value: Any) -> str:
    """How an error names the image itself: its file, or that its bytes live in the dataset."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        named = f", from '{value['path']}'" if value.get("path") else ""
        return f"image (bytes stored in the dataset{named})"
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, (str, os.PathLike)):
        return f"image file '{path}'"
    return "image"


@contextlib.contextmanager
def strict_decoding():
    """Decode with truncation as an error, and big images allowed up to DECODE_PIXEL_CEILING.

    Some libraries set PIL's LOAD_TRUNCATED_IMAGES, which would let a cut-off file through.
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = DECODE_PIXEL_CEILING // 2  # PIL refuses above twice this, warns above it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _open_image(value: Any, where: str) -> Image.Image:
    """Open an image given as PIL image, file path or datasets' undecoded {'bytes', 'path'} dict.

    Only the header is read here (PIL opens lazily); pixels are decoded later, in full.
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
    except Image.DecompressionBombError as err:
        raise RecordError(
            f"{where}: {_image_label(value)} is too large to decode ({err}); downscale it offline"
        ) from err
    except Exception as err:  # PIL raises several types for unreadable files
        raise RecordError(
            f"{where}: {_image_label(value)} cannot be read ({err}); re-save it as PNG or JPEG"
        ) from err


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


def validate_record(record: dict, where: str) -> dict:
    """Check one row against the schema and return it normalised (a new dict of the schema fields).

    `where` names the row in errors, e.g. "synthetic/train row 12 (id=syn-train-00012)".
    The image is returned decoded in full, as an 'L' or 'RGB' PIL image.
    """
    missing = [field for field in FIELDS if field not in record and field not in OPTIONAL_FIELDS]
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

    answer_type = record.get("answer_type") or "choice"
    if answer_type not in ANSWER_TYPES:
        raise RecordError(f"{where}: answer_type {answer_type!r} is unknown; use one of {list(ANSWER_TYPES)}")
    options, answer = _check_answer(record.get("options"), record["answer"], answer_type, where)
    bbox = _check_bbox(record.get("bbox"), image.size, where)
    boxes = _check_boxes(record.get("boxes"), image.size, where)
    for field in ("question_type", "dataset"):
        value = record.get(field)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RecordError(f"{where}: '{field}' must be a non-empty string or None, got {value!r}")
    extra = record.get("extra_images") or []
    if not isinstance(extra, (list, tuple)):
        raise RecordError(f"{where}: 'extra_images' must be a list of images, got {type(extra).__name__}")
    extra_images = [_open_image(value, f"{where} extra image {k}") for k, value in enumerate(extra)]

    images = []
    for k, (value, opened) in enumerate(zip([record["image"], *extra], [image, *extra_images])):
        try:
            images.append(_normalise_mode(opened))
        except Exception as err:  # truncated or corrupt pixel data
            label = _image_label(value) if k == 0 else f"extra image {k - 1}: {_image_label(value)}"
            raise RecordError(f"{where}: {label} cannot be decoded ({err}); re-save it") from err
    return {
        "id": str(record["id"]),
        "image": images[0],
        "question": record["question"],
        "options": options,
        "answer": answer,
        "modality": record["modality"],
        "bbox": bbox,
        "question_type": record.get("question_type"),
        "answer_type": answer_type,
        "extra_images": images[1:],
        "boxes": boxes,
        "dataset": record.get("dataset"),
    }


def _check_answer(options: Any, answer: Any, answer_type: str, where: str) -> tuple[list[str], str]:
    """Choice: 2..5 options and the key letter (upper-cased). Closed/open: no options, the answer text."""
    options = [] if options is None else options
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise RecordError(f"{where}: 'options' must be a list of strings, got {options!r}")
    if answer_type != "choice":
        if options:
            raise RecordError(f"{where}: a {answer_type} question has no options, got {len(options)}; "
                              "make it answer_type 'choice' with a key letter, or drop the options")
        if not isinstance(answer, str) or not answer.strip():
            raise RecordError(f"{where}: answer {answer!r} of a {answer_type} question must be a non-empty text")
        return [], answer.strip()
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise RecordError(
            f"{where}: {len(options)} options, but a choice question needs {MIN_OPTIONS} to "
            f"{MAX_OPTIONS} (letters {LETTERS}); drop or merge options, or set answer_type closed/open"
        )
    letter = answer.strip().upper() if isinstance(answer, str) else None
    if letter is None or len(letter) != 1 or letter not in LETTERS[: len(options)]:
        raise RecordError(
            f"{where}: answer {answer!r} is not one of the option letters "
            f"{list(LETTERS[: len(options)])}; store the letter of the correct option, not its text"
        )
    return list(options), letter


def _check_boxes(boxes: Any, size: tuple[int, int], where: str) -> list[dict]:
    """Named boxes: a list of {"name": non-empty str, "bbox": [x1, y1, x2, y2]} inside the image."""
    if boxes is None:
        return []
    if not isinstance(boxes, (list, tuple)):
        raise RecordError(f"{where}: 'boxes' must be a list of {{'name', 'bbox'}}, got {type(boxes).__name__}")
    out = []
    for k, box in enumerate(boxes):
        if not isinstance(box, dict) or not isinstance(box.get("name"), str) or not box["name"].strip():
            raise RecordError(f"{where}: boxes[{k}] = {box!r} needs a non-empty 'name' and a 'bbox'")
        out.append({"name": box["name"], "bbox": _check_bbox(box.get("bbox"), size, f"{where} boxes[{k}] ({box['name']})")})
        if out[-1]["bbox"] is None:
            raise RecordError(f"{where}: boxes[{k}] ({box['name']}) has no bbox")
    return out


def validate_dataset(
    dataset: datasets.DatasetDict, name: str, max_image_pixels: int | None = None, batch_size: int = 256
) -> dict[str, list[int]]:
    """Check every row of every split, decoding each image in full; raise on the first bad row.

    Returns, per split, the rows whose image has more than `max_image_pixels` pixels (to shrink).
    """
    for split, rows in dataset.items():
        if len(rows) == 0:
            raise ValueError(
                f"data source '{name}' split '{split}' has 0 rows; give it rows (synthetic data: "
                f"data.source.n_{split}=<count>) or map a non-empty split (data.source.splits.{split}=<split>)"
            )
    oversized: dict[str, list[int]] = {}
    with strict_decoding():
        for split, rows in dataset.items():
            oversized[split] = _validate_split(rows, f"{name}/{split}", max_image_pixels, batch_size)
    return oversized


def _validate_split(rows: datasets.Dataset, where: str, max_image_pixels: int | None, batch_size: int) -> list[int]:
    if isinstance(rows.features.get("image"), datasets.Image):
        rows = rows.cast_column("image", datasets.Image(decode=False))  # decoded here, in full
    if "extra_images" in rows.features:
        rows = rows.cast_column("extra_images", datasets.List(datasets.Image(decode=False)))
    oversized = []
    started = last_report = time.monotonic()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        for offset, values in enumerate(zip(*batch.values())):
            record = dict(zip(batch, values))
            clean = validate_record(record, f"{where} row {start + offset} (id={record.get('id')})")
            images = [clean["image"], *clean["extra_images"]]
            if max_image_pixels is not None and any(i.width * i.height > max_image_pixels for i in images):
                oversized.append(start + offset)
            for image in images:
                image.close()
        if time.monotonic() - last_report > _PROGRESS_SECONDS:
            last_report = time.monotonic()
            log.info("%s: checked %d/%d images", where, min(start + batch_size, len(rows)), len(rows))
    log.info("%s: decoded and checked %d images in %.1f s", where, len(rows), time.monotonic() - started)
    return oversized
