"""Lightning DataModule that serves validated VQA records (plain dicts with PIL images) in batches.

Batches stay lists of dicts: the rollout engine builds prompts per model, so no tensors here.
"""

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from medvr.data.schema import VQASource, validate_dataset, validate_record


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
    """Loads `source` once, checks every row up front, and batches records as lists of dicts."""

    def __init__(
        self,
        source: VQASource,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: datasets.DatasetDict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits = self.source.load()
        # Fail before training starts: a bad row deep in the test split would otherwise
        # surface hours later. Only image headers are read here, pixels are decoded per batch.
        validate_dataset(splits, self.source.name)
        self.splits = splits

    def _split(self, split: str) -> _Records:
        self.setup()
        if split not in self.splits:
            raise ValueError(
                f"data source '{self.source.name}' has no '{split}' split (it has "
                f"{sorted(self.splits)}); map one, e.g. data.source.splits.{split}=<dataset split>"
            )
        return _Records(self.splits[split], f"{self.source.name}/{split}")

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._split(split),
            batch_size=batch_size,
            shuffle=shuffle,
            # Same seed, same order of prompts: runs of an ablation grid see identical batches.
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=collate_records,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def modalities(self) -> list[str]:
        """Sorted modality names of the val split (the per-modality metrics to report)."""
        return sorted(set(self._split("val").rows["modality"]))
