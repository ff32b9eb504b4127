"""GRPO across DDP ranks: each rank's weight in the global loss, and train metrics averaged over ranks.

DDP averages gradients over ranks, so a 2-rank step equals one process over the same rows only when
each rank's loss is world_size x (its rows' part of the global loss). A loss normalised by rows
(grpo, dr_grpo) gets that for free when every rank has as many rows; one normalised by the active
tokens of the whole batch (bnpo, dapo) needs the token count of all ranks, which differs per rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

TOKEN_NORMALISED = ("bnpo", "dapo")


def rank_weight(mask: torch.Tensor, loss_type: str, world_size: int, sum_over_ranks: Callable) -> float:
    """world_size * (this rank's rows or active tokens) / (all ranks' ones): the factor on this rank's
    full-batch loss that makes DDP's gradient mean the gradient of the loss over every rank's rows.
    `sum_over_ranks` all-reduces a tensor (Lightning's `strategy.reduce(t, reduce_op="sum")`)."""
    if world_size == 1:
        return 1.0
    count = mask.sum() if loss_type in TOKEN_NORMALISED else torch.tensor(float(mask.shape[0]), device=mask.device)
    total = sum_over_ranks(count.float().clone())  # [] (the reduction may work in place)
    return float(world_size * count / total.clamp(min=1.0))


def _gathered(obj) -> list:
    """`obj` from every rank (rank order); [obj] outside torch.distributed."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that have it (a rank may lack one, e.g. a reward no row got);
    the same dict on every rank."""
    gathered = _gathered(metrics)
    keys = sorted({k for m in gathered for k in m})
    return {k: sum(m[k] for m in gathered if k in m) / sum(k in m for m in gathered) for k in keys}


def union_over_ranks(names: list[str]) -> list[str]:
    """Sorted union of every rank's `names` (e.g. eval groups: a rank may have seen no row of a modality)."""
    return sorted({n for ranked in _gathered(names) for n in ranked})


def close_process_group() -> None:
    """Destroy the default process group if one is up. Lightning leaves it open after `fit`; at interpreter
    exit gloo's threads are then torn down while running and the process aborts ("terminate called without
    an active exception", exit -6) although the run finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
