"""GRPO math as pure tensor functions: group-relative advantages, the clipped policy loss, log-probs.

GRPO (DeepSeekMath, arXiv 2402.03300) replaces PPO's critic with the reward statistics of a group of
completions sampled for the same prompt. The functions here reproduce the semantics of TRL's
`GRPOTrainer` (checked against the installed TRL in tests/test_grpo_vs_trl.py) so that a run of
medvr and a run of TRL with the same settings optimise the same objective:

- advantages: r - group mean, divided by the group std (GRPO; MedVLM-R1, arXiv 2502.19634, with
  eps 1e-4), the batch std, or nothing (Dr.GRPO, arXiv 2503.20783). NaN rewards ("no reward
  function applies") are left out of the statistics and get advantage 0.
- loss aggregation: "grpo" (mean over sequences of per-sequence token means), "bnpo" (token mean
  over the micro-batch), "dr_grpo" (token sum / (N * max_completion_length), Dr.GRPO) and "dapo"
  (token sum / active tokens of the whole generation batch, DAPO arXiv 2503.14476).
- importance_sampling_level="sequence" is GSPO (arXiv 2507.18071): one length-normalised ratio per
  sequence instead of one per token.

No Lightning, transformers or TRL import: the training loop feeds tensors in and logs what comes out.
"""

from __future__ import annotations

import torch
from torch import Tensor

ADVANTAGE_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the entries where `mask` is 1; an all-zero mask gives 0 (denominator clamped to 1)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)  # []
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring NaNs (keepdim); NaN where fewer than two values are present."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    return torch.where(count > 1, var, torch.full_like(var, float("nan"))).sqrt()


def group_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages for `rewards` [N], N = prompts * group_size, each group contiguous.

    advantage = (r - group mean) / (std + eps), the std being the unbiased std of the group
    (`scale="group"`), of the whole batch (`"batch"`), or no division at all (`"none"`, Dr.GRPO).
    NaN rewards are excluded from means and stds and get advantage 0; so does every entry whose
    statistics are undefined (an all-NaN group, or a one-valued group under "group" scaling).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is not one of {ADVANTAGE_SCALES} (config key algo.scale_rewards).")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_advantages needs a 1-D reward tensor whose length is a multiple of group_size; got shape "
            f"{tuple(rewards.shape)} and group_size={group_size}. Check that every prompt has group_size completions."
        )
    groups = rewards.view(-1, group_size)  # [P, G]
    advantages = groups - torch.nanmean(groups, dim=1, keepdim=True)  # [P, G]
    if scale == "group":
        advantages = advantages / (_nanstd(groups, dim=1) + eps)  # [P, G]
    elif scale == "batch":
        advantages = advantages / (_nanstd(rewards) + eps)  # [P, G]
    return torch.nan_to_num(advantages.reshape(-1), nan=0.0)  # [N]


def _metric_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean for logging: over sequences for per-sequence values [N, 1], else over active tokens (as TRL logs)."""
    if x.shape[-1] == 1 and mask.shape[-1] > 1:
        return x.mean()  # []
    return masked_mean(x.expand_as(mask), mask)  # []


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate GRPO loss plus beta * k3 KL, and its detached parts for logging.

    logps, old_logps, ref_logps, mask: [N, T] (completion tokens; mask 1 where the policy acted);
    advantages: [N] (one per sequence) or [N, T] (token-level credit). `old_logps=None` means the
    update is on-policy (ratio 1 in value, so the gradient is the plain policy gradient). `num_items` is the number
    of active tokens in the whole generation batch for "dapo" (default: `mask.sum()`).
    Logged parts: "policy_loss" (the loss value, KL term included, as TRL logs it), "kl" (token mean
    of the k3 KL; 0 when beta == 0), "clip_ratio/low|high|region" (fraction of tokens whose ratio is
    clipped where the clip binds: below 1-eps_low with A < 0, above 1+eps_high with A > 0) and
    "ratio_mean" (mean importance ratio); sequence-level values are averaged over sequences.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES} (config key algo.loss_type).")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r} is not one of {IMPORTANCE_SAMPLING_LEVELS}."
        )
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs reference log-probs (ref_logps); pass them or set algo.beta=0.")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the generation budget in tokens).")
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(
            f"Expected logps and mask [N, T] and advantages [N] or [N, T]; got logps {tuple(logps.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}."
        )
    mask = mask.to(logps.dtype)  # [N, T]
    if old_logps is None:
        old_logps = logps.detach()  # [N, T]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [N, 1]

    log_ratio = logps - old_logps  # [N, T]
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [N, 1]
    ratio = torch.exp(log_ratio)  # [N, T] or [N, 1]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, T] or [N, 1]
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)  # [N, T] or [N, 1]

    kl = torch.zeros((), dtype=logps.dtype, device=logps.device)  # []
    if beta != 0.0:
        ref_minus_logp = ref_logps - logps  # [N, T]
        per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1  # [N, T]
        per_token_loss = per_token_loss + beta * per_token_kl  # [N, T]
        kl = masked_mean(per_token_kl, mask).detach()  # []

    per_token_loss = per_token_loss * mask  # [N, T]
    if loss_type == "grpo":
        loss = (per_token_loss.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()  # []
    elif loss_type == "bnpo":
        loss = per_token_loss.sum() / mask.sum().clamp(min=1.0)  # []
    elif loss_type == "dr_grpo":
        loss = per_token_loss.sum() / (logps.size(0) * max_completion_length)  # []
    else:
        num_items = torch.as_tensor(mask.sum() if num_items is None else num_items, device=logps.device)  # []
        loss = per_token_loss.sum() / num_items.to(logps.dtype).clamp(min=1.0)  # []

    low_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(logps.dtype)  # [N, T] or [N, 1]
    high_clipped = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(logps.dtype)  # [N, T] or [N, 1]
    parts = {
        "policy_loss": loss.detach(),
        "kl": kl,
        "clip_ratio/low": _metric_mean(low_clipped, mask),
        "clip_ratio/high": _metric_mean(high_clipped, mask),
        "clip_ratio/region": _metric_mean(torch.maximum(low_clipped, high_clipped), mask),
        "ratio_mean": _metric_mean(ratio.detach(), mask),
    }
    return loss, parts


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log_softmax(logits)[..., index] for logits [N, T, V] and index [N, T] -> [N, T], without a [N, T, V] copy.

    One row of N at a time is upcast to float32 (bf16 log-softmax is too coarse for importance ratios),
    so the result is float32 (float64 for float64 logits) and peak extra memory is one [T, V] row.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logits = row_logits.to(dtype)  # [T, V]
        selected = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(selected - torch.logsumexp(row_logits, dim=-1))  # [T]
    return torch.stack(rows)  # [N, T]


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last axis: [N, T, V] -> [N, T], float32 or wider.

    Computed `chunk_size` rows at a time to bound memory; -inf logits (masked vocabulary) contribute 0.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.size(-1))  # [N*T, V]
    chunks = []
    for chunk in flat.split(chunk_size):
        logp = torch.log_softmax(chunk.to(dtype), dim=-1)  # [C, V]
        chunks.append(-(logp.exp() * logp.clamp(min=torch.finfo(dtype).min)).sum(-1))  # [C]
    return torch.cat(chunks).reshape(logits.shape[:-1])  # [N, T]
