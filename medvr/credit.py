"""Which tokens get which advantage: loss masks, entropy-gated token credit, span credit (CCA), micro-batch weights.

Pure tensor math beside medvr/grpo.py (no Lightning, no transformers), so GRPOModule's step reads as
rollout -> reward -> advantages -> credit -> loss, and each piece is tested on its own.
"""

from __future__ import annotations

import math

import torch

from medvr.grpo import group_advantages


def group_std(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Std of each group's rewards (NaN = no reward counts as 0): [N] -> [B]."""
    return rewards.nan_to_num(0.0).view(-1, group_size).std(dim=1)


def loss_mask(
    policy_mask: torch.Tensor,
    truncated: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    mask_truncated: bool,
    dynamic_sampling: bool,
) -> torch.Tensor:
    """Policy tokens [N, L] that enter the loss: minus truncated completions and uninformative groups, if asked.

    `dynamic_sampling` (DAPO, arXiv 2503.14476): a group whose rewards are all equal has zero advantage,
    so it leaves the loss and its normalisation.
    """
    mask = policy_mask.float()  # [N, L]
    keep = torch.ones(mask.shape[0], device=mask.device)  # [N]
    if mask_truncated:
        keep = keep * (~truncated).float()
    if dynamic_sampling:
        spread = group_std(rewards, group_size) > 1e-6  # [B]
        keep = keep * spread.repeat_interleave(group_size).float()
    return mask * keep.unsqueeze(1)


def entropy_credit(
    advantages: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor, rho: float
) -> tuple[torch.Tensor, float]:
    """Sequence advantages [N], or [N, L] ones zeroed below the entropy quantile 1 - rho ("Beyond the
    80/20 rule", arXiv 2506.01939, as TRL's top_entropy_quantile); also the share of tokens kept."""
    if rho >= 1.0:
        return advantages, 1.0
    active = entropies[mask.bool()]
    if active.numel() == 0:
        return advantages, 1.0
    threshold = torch.quantile(active.float(), 1.0 - rho)
    high = (entropies >= threshold).float() * mask  # [N, L]
    return advantages.unsqueeze(1) * high, float(high.sum() / mask.sum().clamp(min=1))


def span_mask(shape: tuple[int, int], spans: list[list[tuple[int, int]]], device=None) -> torch.Tensor:
    """[N, L] ones on each row's [start, stop) token spans (the zoom actions), zeros elsewhere."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    for row, row_spans in enumerate(spans):
        for start, stop in row_spans:
            out[row, start:stop] = 1.0
    return out


def span_credit(
    advantages: torch.Tensor,
    spans: torch.Tensor,
    terms: dict[str, list[float | None]],
    weights: dict[str, float],
    group_size: int,
    scale: str,
    eps: float,
) -> torch.Tensor:
    """CCA with credit=token (MedVR, arXiv 2604.08203): each span term's own group-normalised advantage,
    times its weight, is added on the span tokens only; the rest of the sequence keeps `advantages`."""
    if not terms:
        return advantages
    total = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(spans)  # [N, L]
    for name, values in terms.items():
        scores = torch.tensor([math.nan if v is None else v for v in values], device=spans.device)  # [N]
        span_adv = group_advantages(scores, group_size, scale=scale, eps=eps)  # [N]
        total = total + weights[name] * span_adv.unsqueeze(1) * spans  # [N, L]
    return total


def micro_weight(mask: torch.Tensor, lo: int, hi: int, loss_type: str) -> float:
    """Share of the full-batch loss that micro-batch [lo, hi) stands for, so the gradients add up exactly."""
    if loss_type == "bnpo":
        return float(mask[lo:hi].sum() / mask.sum().clamp(min=1))
    if loss_type == "dapo":  # already divided by the whole batch's token count
        return 1.0
    return (hi - lo) / mask.shape[0]
