"""The trajectory batch every explore option produces and the training forward consumes.

One row per trajectory: the whole sequence (left-padded prompt, policy turns, observation
turns) with a loss mask, so single-turn and multi-turn rollouts train through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


@dataclass
class Rollouts:
    input_ids: Tensor  # [N, L] left-padded prompt, then generated/observed tokens
    attention_mask: Tensor  # [N, L]
    mm_token_type_ids: Tensor  # [N, L] 1 on image placeholder tokens
    loss_mask: Tensor  # [N, L] 1 on policy tokens, 0 on prompt, observation and padding
    gen_logps: Tensor  # [N, L] sampling-time log-prob of each policy token (0 elsewhere)
    entropies: Tensor  # [N, L] sampling-time entropy of the policy distribution (0 elsewhere)
    truncated: Tensor  # [N] bool: ended by a length/turn limit, not by EOS
    pixel_values: Tensor  # [P, D] patches of every image, rows in order, images in turn order
    image_grid_thw: Tensor  # [I, 3] one row per image, same order
    images_per_row: Tensor  # [N] number of images in each trajectory
    completions: list[str]  # decoded policy text per trajectory (observations excluded)
    group_size: int
    extras: dict = field(default_factory=dict)  # explore-specific per-row data (zoom boxes, ...)
    image_ids: Tensor | None = None  # [I] equal ids for copies of one image (encoded once); None = all distinct

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def policy_start(self) -> int:
        """First column holding a policy token in any row: logits before it are never needed."""
        cols = self.loss_mask.any(dim=0).nonzero()
        return int(cols[0]) if len(cols) else self.input_ids.shape[1]

    def rows(self, start: int, stop: int) -> Rollouts:
        """Rows [start, stop) with their images: one micro-batch."""
        patches = self.image_grid_thw.prod(-1)  # [I]
        img_lo = int(self.images_per_row[:start].sum())
        img_hi = int(self.images_per_row[:stop].sum())
        patch_lo = int(patches[:img_lo].sum())
        patch_hi = int(patches[:img_hi].sum())
        per_row = {
            f.name: getattr(self, f.name)[start:stop]
            for f in fields(self)
            if f.name not in {"pixel_values", "image_grid_thw", "group_size", "extras", "image_ids"}
        }
        return Rollouts(
            **per_row,
            pixel_values=self.pixel_values[patch_lo:patch_hi],
            image_grid_thw=self.image_grid_thw[img_lo:img_hi],
            group_size=self.group_size,
            extras={k: v[start:stop] for k, v in self.extras.items()},
            image_ids=None if self.image_ids is None else self.image_ids[img_lo:img_hi],
        )

    def micro_batches(self, size: int):
        """(start, stop, rows) for consecutive micro-batches of at most `size` trajectories."""
        for lo in range(0, len(self), size):
            hi = min(lo + size, len(self))
            yield lo, hi, self.rows(lo, hi)

    def model_inputs(self) -> dict[str, Tensor]:
        """Inputs of the plain forward: every image's patches (copies encoded again)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }

    def to(self, device: torch.device) -> Rollouts:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in moved}
        return Rollouts(**moved, **rest)
