"""Lightning DataModule that serves validated VQA records (plain dicts with PIL images) in batches.

Batches stay lists of dicts: the rollout engine builds prompts per model, so no tensors here.
setup() decodes every image once per dataset version (a passing verdict is cached, keyed by the
splits' datasets fingerprints) and shrinks images above `max_image_pixels` once, so that no
batch decodes a 100-megapixel scan.
"""

import hashlib
import io
import json
import logging
import math
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from medvr.data.sampler import EpochShuffle
from medvr.data.schema import (
    VALIDATION_VERSION,
    VQASource,
    strict_decoding,
    validate_dataset,
    validate_record,
)

log = logging.getLogger(__name__)


def collate_records(batch: list[dict]) -> list[dict]:
    """Keep the batch as the list of records (module-level so worker processes can pickle it)."""
    return list(batch)


class _Records(Dataset):
    """Map-style view of one split; each row is decoded once, when fetched."""

    def __init__(self, rows: datasets.Dataset, name: str):
        self.rows = rows
        self.name = name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        return validate_record(row, f"{self.name} row {index} (id={row.get('id')})")


class VQADataModule(LightningDataModule):
    """Loads `source` once, checks every row up front, and batches records as lists of dicts.

    `max_image_pixels`: images above it are downscaled once in setup (None keeps every size).
    `verdict_cache`: directory for passing verdicts and the downscaled copies (None: no caching).
    """

    def __init__(
        self,
        source: VQASource,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        max_image_pixels: int | None = None,
        verdict_cache: str | None = None,
        path: str | None = None,
    ):
        """`path` is where a real dataset lives; its source reads it (`source.path: ${..path}`)."""
        super().__init__()
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"data.max_image_pixels={max_image_pixels}: give a positive pixel count or null")
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.path = path
        self.max_image_pixels = max_image_pixels
        self.verdict_cache = None if verdict_cache is None else Path(verdict_cache)
        self.splits: datasets.DatasetDict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.source.load()
        key = self._verdict_key(splits)
        verdict_file = self._verdict_file(key)
        verdict = _read_verdict(verdict_file, key)
        if verdict is None:
            # Fail before training starts: a truncated image deep in the test split would
            # otherwise surface hours later. Every image is decoded once per dataset version.
            oversized = validate_dataset(splits, self.source.name, self.max_image_pixels)
        else:
            log.info("data source '%s' passed its checks before (%s): not decoded again", self.source.name,
                     verdict_file)
            oversized = verdict["oversized"]
        splits = datasets.DatasetDict(
            {split: self._shrink(rows, split, oversized[split], verdict_file) for split, rows in splits.items()}
        )
        if verdict is None and verdict_file is not None:
            _write_atomic(verdict_file, {"source": self.source.name, "key": key, "oversized": oversized})
        self.splits = splits

    def _verdict_key(self, splits: datasets.DatasetDict) -> dict:
        """Everything a passing verdict depends on; a change to any of it means a new check."""
        return {
            "validation_version": VALIDATION_VERSION,
            "max_image_pixels": self.max_image_pixels,
            "splits": {
                split: {"fingerprint": rows._fingerprint, "rows": len(rows), "files": _image_files_signature(rows)}
                for split, rows in sorted(splits.items())
            },
        }

    def _verdict_file(self, key: dict) -> Path | None:
        if self.verdict_cache is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.source.name).strip("_.")[-40:]
        return self.verdict_cache / f"{slug}-{digest}.json"

    def _shrink(self, rows: datasets.Dataset, split: str, oversized: list[int], verdict_file: Path | None):
        """Replace the rows whose image is above max_image_pixels by a downscaled copy, once."""
        if not oversized:
            return rows
        where = f"{self.source.name}/{split}"
        cache = None if verdict_file is None else verdict_file.with_name(f"{verdict_file.stem}-{split}-shrunk.arrow")
        raw = _undecoded(rows)
        with strict_decoding():
            small = raw.select(oversized, keep_in_memory=True).map(
                _shrink_batch,
                fn_kwargs={"rows": oversized, "where": where, "max_pixels": self.max_image_pixels},
                with_indices=True,
                batched=True,
                batch_size=4,
                features=raw.features,
                cache_file_name=None if cache is None else str(cache),
                load_from_cache_file=cache is not None,
                keep_in_memory=cache is None,
                desc=f"{where}: downscaling large images",
            )
        log.info(
            "%s: %d image(s) above data.max_image_pixels=%d served downscaled (copies in %s)",
            where, len(oversized), self.max_image_pixels, cache or "memory",
        )
        # Rows point at the small copies appended at the end; nothing else is copied.
        order = list(range(len(rows)))
        for position, row in enumerate(oversized):
            order[row] = len(rows) + position
        combined = datasets.concatenate_datasets([raw, small]).select(order, keep_in_memory=True)
        return combined.cast(rows.features)

    def _split(self, split: str) -> _Records:
        self.setup()
        if split not in self.splits:
            raise ValueError(
                f"data source '{self.source.name}' has no '{split}' split (it has "
                f"{sorted(self.splits)}); map one, e.g. data.source.splits.{split}=<dataset split>"
            )
        return _Records(self.splits[split], f"{self.source.name}/{split}")

    def _loader(self, split: str, batch_size: int, sampler: EpochShuffle | list[int] | None = None) -> DataLoader:
        return DataLoader(
            self._split(split),
            batch_size=batch_size,
            sampler=sampler,
            # seeds worker processes from its own generator, never from torch's global RNG (rollouts sample from that)
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=collate_records,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Same seed, same order of prompts: runs of an ablation grid see identical batches, and a
        # resumed run continues the epoch after the batches its checkpoint had trained on.
        # Under DDP each rank takes its own share of every global batch (medvr/data/sampler.py).
        rank, world = self._rank()
        sampler = EpochShuffle(len(self._split("train")), self.seed, rank, world)
        if self.trainer is not None:
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.start(self.trainer.current_epoch, done * self.batch_size * world)
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, self._eval_shard("val"))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, self._eval_shard("test"))

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) outside a distributed trainer."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _eval_shard(self, split: str) -> list[int] | None:
        """Rows rank, rank + world, ... of an eval split: every row scored exactly once over all ranks (no padding)."""
        rank, world = self._rank()
        return None if world == 1 else list(range(rank, len(self._split(split)), world))

    def modalities(self) -> list[str]:
        """Sorted modality names of the val split (the per-modality metrics to report)."""
        return sorted(set(self._split("val").rows["modality"]))


def _undecoded(rows: datasets.Dataset) -> datasets.Dataset:
    """The split with its image columns as undecoded {'bytes', 'path'} values."""
    rows = rows.cast_column("image", datasets.Image(decode=False))
    if "extra_images" in rows.column_names:
        rows = rows.cast_column("extra_images", datasets.List(datasets.Image(decode=False)))
    return rows


def _image_paths(column: pa.ChunkedArray) -> list:
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    if pa.types.is_struct(column.type):  # datasets.Image(): a path counts only without bytes
        column = pc.filter(pc.struct_field(column, "path"), pc.is_null(pc.struct_field(column, "bytes")))
    return column.to_pylist()


def _image_files_signature(rows: datasets.Dataset) -> str | None:
    """Hash of the (path, size, mtime) of the image files a split points to, None if it has none.

    The datasets fingerprint covers the paths but not the files, which can change on their own.
    """
    if "image" not in rows.column_names:
        return None
    columns = [c for c in ("image", "extra_images") if c in rows.column_names]
    paths = [path for c in columns for path in _image_paths(rows.data.column(c)) if isinstance(path, str)]
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _read_verdict(path: Path | None, key: dict) -> dict | None:
    """The cached verdict for exactly this key, or None (no cache, none yet, or unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        verdict = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("key") == key else None


def _write_atomic(path: Path, content: dict) -> None:
    """Write JSON via a private temp file and os.replace, so parallel jobs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size of the same aspect ratio with at most max_pixels pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    new_width, new_height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if new_width * new_height > max_pixels:  # float rounding: off by at most a pixel per side
        new_width, new_height = max(1, new_width - 1), max(1, new_height - 1)
    return new_width, new_height


def _scale_box(bbox: list[int], old: tuple[int, int], new: tuple[int, int]) -> list[int]:
    """Scale [x1, y1, x2, y2] to the new size, rounding outwards so the box keeps what it framed."""
    (width, height), (new_width, new_height) = old, new
    x1, y1, x2, y2 = bbox
    # floor(a) < ceil(b) for a < b, and both stay inside the new image: exact integer arithmetic
    return [x1 * new_width // width, y1 * new_height // height,
            -(-x2 * new_width // width), -(-y2 * new_height // height)]


def _small_copy(image: Image.Image, max_pixels: int) -> tuple[dict, tuple[int, int]]:
    """A PNG copy within max_pixels (the image itself, re-encoded, when it is small enough) and its size."""
    size = image.size if image.width * image.height <= max_pixels else _fit(image.width, image.height, max_pixels)
    small = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}, size


def _shrink_batch(batch: dict, indices: list[int], rows: list[int], where: str, max_pixels: int) -> dict:
    """datasets.map function: each image -> a PNG copy within max_pixels, its boxes scaled to match."""
    for k, position in enumerate(indices):
        record = {field: column[k] for field, column in batch.items()}
        clean = validate_record(record, f"{where} row {rows[position]} (id={record['id']})")
        image = clean["image"]
        batch["image"][k], size = _small_copy(image, max_pixels)
        if clean["bbox"] is not None:
            batch["bbox"][k] = _scale_box(clean["bbox"], image.size, size)
        if clean["boxes"]:
            batch["boxes"][k] = [{"name": b["name"], "bbox": _scale_box(b["bbox"], image.size, size)}
                                 for b in clean["boxes"]]
        if clean["extra_images"]:
            batch["extra_images"][k] = [_small_copy(extra, max_pixels)[0] for extra in clean["extra_images"]]
    return batch
