"""When to force a regrounding step: the policy's entropy (EVR, MedVR arXiv 2604.08203) or chance.

A trigger decides causally, one decoding step at a time: at step t of a turn it sees only the
entropies and text of steps <= t, exactly what a decoder has when it must choose between sampling
token t and stopping the row there to force `<zoom>`. So a rollout engine can stop the row at
the trigger and decode nothing it would throw away, and an engine that decodes the whole turn
first (HF `generate`) replays the same decisions with `positions` and gets the same cuts.

`allowed` marks the steps where a trigger may fire: at least `min_tokens` policy tokens into the
turn, while the reasoning is open (`window_open`), in rows with triggers left; the engine builds it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medvr.explore.zoom import ACTION_OPEN
from medvr.rollout.sampling import Noise

THRESHOLD_MODES = ("absolute", "normalized", "quantile")
# entropies within this many nats below the threshold count as reaching it: the G copies of a prompt
# have equal entropies up to float noise that differs between engines (batch layout, cached vs full
# forward), and a quantile often lands on such a tie; without the tolerance engines would disagree
TIE_NATS = 1e-4
# text that closes the window in which a trigger may fire: the model is acting or answering
WINDOW_ENDS = ("</think>", "<answer>", ACTION_OPEN)


def window_open(text: str) -> bool:
    """True while a trigger may still fire after `text` (this turn's text so far).

    Closed once a window end has been written, and while the text ends inside one
    (`...</thi`): the cut never splits a tag.
    """
    if any(end in text for end in WINDOW_ENDS):
        return False
    return not any(text.endswith(end[:k]) for end in WINDOW_ENDS for k in range(1, len(end)))


def first_over(entropies: Tensor, allowed: Tensor, threshold: float | Tensor) -> Tensor:
    """Per row, the first allowed position whose entropy is >= threshold; -1 where none."""
    over = (entropies >= threshold - TIE_NATS) & allowed  # [N, L]
    return torch.where(over.any(dim=1), over.long().argmax(dim=1), -1)  # [N]


def _check_window(min_tokens: int, max_triggers: int) -> None:
    if min_tokens < 0 or max_triggers < 1:
        raise ValueError("explore.trigger: need min_tokens >= 0 and max_triggers >= 1")


class _Replay:
    """`positions` for every trigger: step a turn watch over the columns of a finished turn."""

    def positions(self, entropies: Tensor, allowed: Tensor, vocab_size: int, noise: Noise | None = None,
                  slots: Tensor | None = None) -> Tensor:
        """[N] cut position per row (-1 = no trigger), as the step-by-step decisions would place them."""
        n, length = entropies.shape
        slots = torch.arange(n) if slots is None else slots
        watch = self.watch(slots, noise if noise is not None else Noise(n, 1), vocab_size)
        cut = torch.full((n,), -1, dtype=torch.long)
        for t in range(length):
            live = (cut < 0).nonzero().squeeze(1)
            fire = watch.step(live, entropies[live, t].cpu(), allowed[live, t].cpu())
            cut[live[fire]] = t
        return cut.to(entropies.device)


class EntropyTrigger(_Replay):
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

    def watch(self, slots: Tensor, noise: Noise, vocab_size: int) -> _EntropyWatch:
        """A turn's step-by-step decisions for rows drawing on `slots` of `noise` (unused: no randomness)."""
        fixed = {"absolute": self.threshold, "normalized": self.threshold * math.log(vocab_size)}.get(self.mode)
        return _EntropyWatch(fixed, self.threshold)


class _EntropyWatch:
    """Fire where H_t >= the threshold: fixed, or the q-quantile of the allowed entropies seen so far.

    In quantile mode the threshold at step t is the quantile over every allowed (row, step <= t) of
    the turn's batch: causal, so the decoder can stop a row the moment it fires.
    """

    def __init__(self, fixed: float | None, quantile: float):
        self.fixed = fixed
        self.quantile = quantile
        self.seen: list[Tensor] = []

    def threshold(self) -> float:
        if self.fixed is not None:
            return self.fixed
        values = torch.cat(self.seen) if self.seen else torch.zeros(0)
        return float(torch.quantile(values.double(), self.quantile)) if values.numel() else math.inf

    def step(self, rows: Tensor, entropies: Tensor, allowed: Tensor) -> Tensor:
        """[m] fire decisions for the `rows` still decoding, from their entropy [m] at this step."""
        if self.fixed is None and allowed.any():
            self.seen.append(entropies[allowed].double())
        return allowed & (entropies >= self.threshold() - TIE_NATS)


class RandomTrigger(_Replay):
    """`explore=random_crop`: with probability `rate`, fire at a uniform one of the first `span` allowed steps.

    The control for EVR: same machinery, no entropy signal and no model choice of region. A row
    whose window closes before its drawn step does not fire, so the trigger rate is at most `rate`:
    match an EVR run's train/explore/trigger_rate by the logged rate, not by `rate` alone.
    """

    writes_box = True

    def __init__(
        self, rate: float, min_tokens: int, max_triggers: int, min_frac: float, max_frac: float, branch: bool,
        span: int,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"explore.trigger.rate={rate} must lie in [0, 1]")
        if not 0.0 < min_frac <= max_frac <= 1.0:
            raise ValueError("explore.trigger: need 0 < min_frac <= max_frac <= 1")
        if span < 1:
            raise ValueError(f"explore.trigger.span={span} must be >= 1")
        _check_window(min_tokens, max_triggers)
        self.span = span
        self.rate = rate
        self.min_tokens = min_tokens
        self.max_triggers = max_triggers
        self.min_frac = min_frac
        self.max_frac = max_frac
        self.branch = branch

    def watch(self, slots: Tensor, noise: Noise, vocab_size: int) -> _RandomWatch:
        draws = noise.trigger[slots.cpu()]  # [n, 4]
        fires = draws[:, 0] < self.rate
        target = (draws[:, 1] * self.span).long()  # fire at the target-th allowed step
        return _RandomWatch(fires, target)

    def box(self, width: int, height: int, draws: Tensor | None = None) -> tuple[int, int, int, int]:
        """A uniformly placed box whose sides are uniform fractions of the image's, in pixels.

        `draws` [4] are the row's uniform numbers (`Noise.box`); fresh ones when None.
        """
        u = torch.rand(4, dtype=torch.float64) if draws is None else draws
        fw, fh = (self.min_frac + (self.max_frac - self.min_frac) * u[:2]).tolist()
        w, h = max(1, round(fw * width)), max(1, round(fh * height))
        x, y = (u[2:] * torch.tensor([width - w + 1, height - h + 1], dtype=torch.float64)).long().tolist()
        return x, y, x + w, y + h


class _RandomWatch:
    """Fire at a row's `target`-th allowed step, if the row was drawn to fire and gets that far."""

    def __init__(self, fires: Tensor, target: Tensor):
        self.fires = fires
        self.target = target
        self.count = torch.zeros_like(target)

    def step(self, rows: Tensor, entropies: Tensor, allowed: Tensor) -> Tensor:
        fire = allowed & self.fires[rows] & (self.count[rows] == self.target[rows])
        self.count[rows] += allowed.long()
        return fire
