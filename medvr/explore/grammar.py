"""Constrained decoding of the zoom action: inside `<zoom>` only `[x1, y1, x2, y2]</zoom>` can be written.

`explore.constrain_actions=true`. Once a row's text opens an action (the model wrote `<zoom>`, or a
trigger forced `<zoom>[`), each step's distribution is restricted to the tokens that keep the text
after `<zoom>` a prefix of a well-formed action: four integers without leading zeros, `, ` between
them, `]</zoom>` after the last, x1 < x2 <= the row's frame width and y1 < y2 <= its height (the
model's coordinate convention, `ZoomEnv.frame`). Every action then parses and has positive area;
where the box points is still the policy's choice.

The restriction is part of the policy: a token's log-prob is taken under the masked distribution,
at sampling and in every training forward. The engines record the allowed set of each constrained
token (`TurnOutput.allowed`), the trajectory carries it to `Rollouts.extras["allowed"]`, and
`token_logps` applies the same masks (`medvr.rollout.sampling.restrict`), so sampling and training log-probs stay equal.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from medvr.explore.zoom import ACTION_CLOSE, ACTION_OPEN

_SEPARATORS = (", ", ", ", ", ", "]" + ACTION_CLOSE)
_CHARS = set("0123456789, [" + "]" + ACTION_CLOSE)
_DIGITS = re.compile(r"[0-9]*")


def open_action(text: str) -> str | None:
    """The text after the last `<zoom>` of `text` when that action is not closed yet, else None."""
    at = text.rfind(ACTION_OPEN)
    if at < 0:
        return None
    rest = text[at + len(ACTION_OPEN):]
    return None if ACTION_CLOSE in rest else rest


def _completes(digits: str, lo: int, hi: int) -> bool:
    """True when `digits` (a number being written, no leading zero) can still end as a value in [lo, hi]."""
    value = int(digits)
    if lo <= value <= hi:
        return True
    if digits == "0":
        return False
    scale = 10
    while value * scale <= hi:
        if max(value * scale, lo) <= min((value + 1) * scale - 1, hi):
            return True
        scale *= 10
    return False


def viable(text: str, width: int, height: int) -> bool:
    """True when `text` (what follows `<zoom>`) is a prefix of a well-formed action in a width x height frame."""
    if not text:
        return True
    if text[0] != "[":
        return False
    at, values = 1, []
    for k, sep in enumerate(_SEPARATORS):
        digits = _DIGITS.match(text, at).group()
        if len(digits) > 1 and digits[0] == "0":
            return False
        side = width if k % 2 == 0 else height
        lo, hi = (0, side - 1) if k < 2 else (values[k - 2] + 1, side)  # x1 < x2 <= width, y1 < y2 <= height
        at += len(digits)
        if at == len(text):  # this number is still being written
            return not digits or _completes(digits, lo, hi)
        if not digits or not lo <= int(digits) <= hi:
            return False
        values.append(int(digits))
        rest = text[at:]
        if len(rest) <= len(sep):
            return sep.startswith(rest)
        if k == 3 or not rest.startswith(sep):
            return False
        at += len(sep)
    return False


class ActionGrammar:
    """The allowed next tokens of an open action, per action text and frame (memoised)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # only tokens made of the action's characters can ever continue it
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.candidates = [(i, s) for i, s in enumerate(texts) if s and set(s) <= _CHARS]
        self.memo: dict[tuple[str, int, int], Tensor | None] = {}

    def allowed(self, text: str, frame: tuple[int, int]) -> Tensor | None:
        """Token ids [k] that keep the action `text` (after `<zoom>`) well-formed; None when unconstrained.

        None where the text is already malformed (an action opened mid-token with other text after it):
        the environment rejects that action, and masking every token would leave nothing to sample.
        """
        key = (text, *frame)
        if key not in self.memo:
            ids = [i for i, s in self.candidates if viable(text + s, *frame)] if viable(text, *frame) else []
            self.memo[key] = torch.tensor(ids, dtype=torch.long) if ids else None
        return self.memo[key]

    def step(self, texts: list[str], frames: list[tuple[int, int]]) -> dict[int, Tensor]:
        """{row: allowed ids} for the rows whose text (so far in the trajectory's action) has an open action."""
        out = {}
        for r, (text, frame) in enumerate(zip(texts, frames)):
            action = open_action(text)
            if action is not None and (ids := self.allowed(action, frame)) is not None:
                out[r] = ids
        return out

