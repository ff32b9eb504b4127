"""When to force a regrounding step: the policy's entropy (EVR, MedVR arXiv 2604.08203) or chance.

Both triggers work on one turn's sampled tokens after the fact. Autoregressive sampling makes
"cut the row before token t and force `<zoom>`" exactly the same as having stopped there while
sampling, and a batch quantile of the entropy is then well defined. `allowed` [N, L] marks the
positions where a trigger may fire (after `min_tokens`, before the reasoning ends, rows with
triggers left); the engine builds it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

THRESHOLD_MODES = ("absolute", "normalized", "quantile")


def first_over(entropies: Tensor, allowed: Tensor, threshold: float | Tensor) -> Tensor:
    """Per row, the first allowed position whose entropy is >= threshold; -1 where none."""
    over = (entropies >= threshold) & allowed  # [N, L]
    return torch.where(over.any(dim=1), over.long().argmax(dim=1), -1)  # [N]


def _check_window(min_tokens: int, max_triggers: int) -> None:
    if min_tokens < 0 or max_triggers < 1:
        raise ValueError("explore.trigger: need min_tokens >= 0 and max_triggers >= 1")


class EntropyTrigger:
    """`explore=evr`: fire where H_t >= threshold (nats, fraction of log|V|, or batch quantile)."""

    writes_box = False  # the model writes the box after the forced `<zoom>[`

    def __init__(self, mode: str, threshold: float, min_tokens: int, max_triggers: int, branch: bool):
        if mode not in THRESHOLD_MODES:
            raise ValueError(f"explore.trigger.mode={mode!r}: choose one of {THRESHOLD_MODES}")
        if mode != "absolute" and not 0.0 < threshold < 1.0:
            raise ValueError(f"explore.trigger.threshold={threshold} must lie in (0, 1) for mode={mode}")
        _check_window(min_tokens, max_triggers)
        self.mode = mode
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.max_triggers = max_triggers
        self.branch = branch

    def threshold_for(self, entropies: Tensor, allowed: Tensor, vocab_size: int) -> float:
        if self.mode == "absolute":
            return self.threshold
        if self.mode == "normalized":
            return self.threshold * math.log(vocab_size)
        candidates = entropies[allowed].float()
        return float(torch.quantile(candidates, self.threshold)) if candidates.numel() else math.inf

    def positions(self, entropies: Tensor, allowed: Tensor, vocab_size: int) -> Tensor:
        """[N] cut position per row (-1 = no trigger)."""
        return first_over(entropies, allowed, self.threshold_for(entropies, allowed, vocab_size))


class RandomTrigger:
    """`explore=random_crop`: fire with probability `rate` at a uniform allowed position, zoom into a random box.

    The control for EVR: same machinery, no entropy signal and no model choice of region. Set
    `rate` to an EVR run's train/explore/trigger_rate to match the expected number of zooms.
    """

    writes_box = True

    def __init__(
        self, rate: float, min_tokens: int, max_triggers: int, min_frac: float, max_frac: float, branch: bool
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"explore.trigger.rate={rate} must lie in [0, 1]")
        if not 0.0 < min_frac <= max_frac <= 1.0:
            raise ValueError("explore.trigger: need 0 < min_frac <= max_frac <= 1")
        _check_window(min_tokens, max_triggers)
        self.rate = rate
        self.min_tokens = min_tokens
        self.max_triggers = max_triggers
        self.min_frac = min_frac
        self.max_frac = max_frac
        self.branch = branch

    def positions(self, entropies: Tensor, allowed: Tensor, vocab_size: int) -> Tensor:
        n = allowed.shape[0]
        counts = allowed.sum(dim=1)  # [N]
        fire = (torch.rand(n) < self.rate).to(allowed.device) & (counts > 0)
        pick = (torch.rand(n).to(allowed.device) * counts).long()  # [N] index among the allowed positions
        rank = allowed.long().cumsum(dim=1) - 1  # [N, L] rank of each allowed position
        hit = allowed & (rank == pick.unsqueeze(1))
        return torch.where(fire, hit.long().argmax(dim=1), -1)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """A uniformly placed box whose sides are uniform fractions of the image's, in pixels."""
        fw, fh = (self.min_frac + (self.max_frac - self.min_frac) * torch.rand(2)).tolist()
        w, h = max(1, round(fw * width)), max(1, round(fh * height))
        x, y = (torch.rand(2) * torch.tensor([width - w + 1, height - h + 1])).long().tolist()
        return x, y, x + w, y + h
