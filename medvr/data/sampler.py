"""The training order as a pure function of (seed, epoch), able to start mid-epoch: resumed runs see the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation of range(n) each epoch, drawn from (seed, epoch) alone.

    `start(epoch, offset)` positions the next iteration: epoch `epoch`, skipping its first `offset`
    indices (the batches a checkpointed run had already trained on). Skipping happens here, on
    indices, so no skipped record is decoded.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0
        self.offset = 0

    def start(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        offset, self.offset = self.offset, 0
        yield from self.order(self.epoch)[offset:]
        self.epoch += 1  # reached only when the epoch was consumed to its end

    def __len__(self) -> int:
        return self.n  # the whole epoch: Lightning counts the batches already trained in its restored progress
