"""The training order as a pure function of (seed, epoch), able to start mid-epoch: resumed runs see the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation of range(n) each epoch, drawn from (seed, epoch) alone, dealt out across ranks.

    `start(epoch, offset)` positions the next iteration: epoch `epoch`, skipping its first `offset`
    indices of the whole permutation (the batches a checkpointed run had already trained on, on all
    ranks together). Skipping happens here, on indices, so no skipped record is decoded.
    With `world_size` ranks, rank r takes positions r, r + world_size, ... of the permutation, so the
    ranks' prompts are disjoint and together are the prompts one process would take in the same steps;
    the last n % world_size positions are dropped so that every rank has as many batches (DDP needs it).
    medvr shards here rather than through Lightning's DistributedSamplerWrapper, which re-shuffles
    nothing but cannot start mid-epoch (conf/trainer/default.yaml: use_distributed_sampler false).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochShuffle: rank {rank} is not in [0, world_size={world_size})")
        self.n = n
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0

    def start(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def __iter__(self):
        offset, self.offset = self.offset, 0
        used = self.order(self.epoch)[: len(self) * self.world_size]
        yield from used[offset + self.rank :: self.world_size]
        self.epoch += 1  # reached only when the epoch was consumed to its end

    def __len__(self) -> int:
        # the whole epoch: Lightning counts the batches already trained in its restored progress
        return self.n // self.world_size
