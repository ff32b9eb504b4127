"""Token choice shared by every rollout engine, so one seed gives the same rollouts on any engine.

Sampling is by inverse CDF with one uniform number per (trajectory, policy token), drawn up front
from a generator seeded off the global RNG. The token a row samples then depends only on its own
logits and its own numbers, not on which other rows share the decode batch, in which order the
engine visits them, or how many random numbers the engine's kernels consume. That is what lets
finished rows leave the batch, and lets the HF `generate` engine and the cached engine agree.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Noise:
    """Uniform numbers per trajectory slot and policy-token index, and the trigger draws, for one rollout."""

    def __init__(self, slots: int, max_tokens: int, seed: int | None = None):
        self.seed = int(torch.randint(2**62, ()).item()) if seed is None else seed
        gen = torch.Generator().manual_seed(self.seed)
        self.uniform = torch.rand(slots, max(max_tokens, 1), generator=gen, dtype=torch.float64)  # [S, T]
        self.trigger = torch.rand(slots, 4, generator=gen, dtype=torch.float64)  # [S, 4] per-slot trigger draws
        self.box = torch.rand(slots, 4, generator=gen, dtype=torch.float64)  # [S, 4] per-slot random boxes

    def at(self, slots: Tensor, index: Tensor) -> Tensor:
        """[n] uniforms for rows in `slots` at policy-token `index` (both [n])."""
        index = index.clamp(max=self.uniform.shape[1] - 1)
        return self.uniform[slots.cpu(), index.cpu()]


def policy_logprobs(logits: Tensor, temperature: float, forbidden: Tensor,
                    allowed: dict[int, Tensor] | None = None) -> Tensor:
    """[n, V] log-softmax of raw logits / T over the policy's vocabulary (forbidden tokens at -inf).

    `allowed` {row: token ids} restricts those rows to their ids (constrained actions, medvr/explore/grammar.py).
    """
    z = (logits.float() / temperature).index_fill_(-1, forbidden.to(logits.device), float("-inf"))
    if allowed:
        restrict(z, (torch.tensor(list(allowed)),), list(allowed.values()))
    return torch.log_softmax(z, dim=-1)


def entropy(logp: Tensor) -> Tensor:
    """[n] entropy of each row of a [n, V] log-prob matrix (0 * -inf taken as 0)."""
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def choose(logp: Tensor, uniforms: Tensor | None) -> Tensor:
    """[n] tokens: inverse-CDF samples for `uniforms` [n], or argmax where `uniforms` is None (greedy)."""
    if uniforms is None:
        return logp.argmax(dim=-1)
    if not torch.isfinite(logp).any(dim=-1).all() or torch.isnan(logp).any():
        raise FloatingPointError("probability tensor contains nan or inf")
    cdf = logp.double().exp().cumsum(dim=-1)  # [n, V]
    target = uniforms.to(cdf.device).unsqueeze(-1) * cdf[:, -1:]  # [n, 1]
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first index with cdf > u
    return token.clamp(max=logp.shape[-1] - 1)


def restrict(logits: Tensor, index: tuple[Tensor, ...], sets: list[Tensor]) -> Tensor:
    """`logits` with every token outside `sets[k]` at -inf at position `index[...][k]` (in place; returned).

    `index` selects k rows of `logits` ([n, V]: one index tensor; [n, L, V]: row and column tensors).
    """
    if not sets:
        return logits
    keep = torch.zeros(len(sets), logits.shape[-1], dtype=torch.bool, device=logits.device)
    rows = torch.cat([torch.full((len(s),), k, dtype=torch.long) for k, s in enumerate(sets)]).to(logits.device)
    keep[rows, torch.cat(sets).to(logits.device)] = True
    index = tuple(i.to(logits.device) for i in index)
    logits[index] = logits[index].masked_fill(~keep, float("-inf"))
    return logits
