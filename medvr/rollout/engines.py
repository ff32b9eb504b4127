"""Rollout engines: how one turn of every running trajectory is decoded (`rollout=` group).

The multi-turn logic (zoom environment, triggers, branching, bookkeeping) lives in
`medvr/explore/engine.py` and is the same for every engine; an engine only turns "these rows,
these budgets, this trigger watch" into each row's tokens, log-probs and entropies. Options:
- `rollout=hf`: HF `generate` per turn over the whole history; triggers are replayed on the
  finished turn and the tokens after a cut are discarded. The reference path.
- `rollout=cached` (medvr/rollout/cached.py): medvr's own decode loop with each prompt prefilled
  once, images encoded once, rows leaving the batch when they stop, and KV caches kept across turns.
A vLLM/SGLang engine would be a third class with the same `session(...)` and `Session.turn(...)`.

Every engine samples through `medvr.rollout.sampling` (inverse CDF on per-row uniform numbers),
so a seed gives the same rollouts whichever engine produced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import LogitsProcessor, LogitsProcessorList

from medvr.explore.triggers import window_open
from medvr.rollout.generate import NonFiniteError, generation_config, sample
from medvr.rollout.sampling import Noise, choose, policy_logprobs, restrict


@dataclass
class TurnOutput:
    """One row's output of one turn."""

    tokens: Tensor  # [n] policy tokens kept
    logps: Tensor  # [n]
    entropies: Tensor  # [n]
    ended: str = "eos"  # eos | action (a stop string) | budget | trigger
    trigger_entropy: float | None = None  # entropy of the step where the trigger fired
    continuation: TurnOutput | None = None  # the un-cut turn of a triggered row (branched rollouts)
    state: object = None  # engine state carried to the row's next turn (a KV cache), opaque
    allowed: dict[int, Tensor] = field(default_factory=dict)  # token index -> ids it was restricted to


@dataclass
class TurnRequest:
    """What the multi-turn logic asks of an engine for one turn."""

    limits: list[int]  # per row: policy tokens left in the trajectory's budget
    offsets: list[int]  # per row: policy tokens so far (index into the row's uniform numbers)
    slots: Tensor  # [n] row of `Noise` each trajectory draws from
    watch: object | None = None  # a trigger's turn watch, or None
    eligible: list[bool] = field(default_factory=list)  # rows the trigger may cut this turn
    min_tokens: int = 0  # steps into the turn before a trigger may fire
    fork: bool = False  # keep the un-cut continuation of every triggered row
    grammar: object | None = None  # ActionGrammar: restrict open zoom actions (medvr/explore/grammar.py)
    leads: list[str] = field(default_factory=list)  # per row: its open action's text before this turn
    frames: list[tuple[int, int]] = field(default_factory=list)  # per row: its box coordinates' extent

    def allowed(self, rows: list[int], texts: list[str]) -> dict[int, Tensor]:
        """{k: token ids} restricting rows[k], whose turn text so far is texts[k], inside an open action."""
        if self.grammar is None:
            return {}
        return self.grammar.step([self.leads[r] + x for r, x in zip(rows, texts)], [self.frames[r] for r in rows])


class Pieces:
    """Per-token text, decoded once per token id, to follow a turn's text step by step."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]


def ends_with_stop(previous: str, piece: str, stops: list[str]) -> bool:
    """True when one of `stops` ends inside `piece`, the newest token's text."""
    text = previous + piece
    return any(stop in text[max(0, len(previous) - len(stop) + 1):] for stop in stops)


CACHES = ("dynamic", "static")


class HFGenerate:
    """`rollout=hf`: one `model.generate` call per turn over the whole history of every running row.

    `cache=static` preallocates HF's StaticCache for the turn (prompt + budget): fixed shapes, which
    `generate` compiles its decoding forward for with `torch.compile` on an accelerator (`compile=true`,
    transformers' own rule: a compilable cache on CUDA/XPU/MPS); on CPU it decodes uncompiled. Either
    cache gives the same rollouts.
    """

    name = "hf"

    def __init__(self, cache: str = "dynamic", compile: bool = True):
        if cache not in CACHES:
            raise ValueError(f"rollout.cache={cache!r}: choose one of {CACHES}")
        self.cache, self.compile = cache, compile

    def session(self, model, processor, *, temperature, greedy, noise, stop_strings, forbidden_ids, stop_ids):
        session = _HFSession(model, processor, temperature, greedy, noise, stop_strings, forbidden_ids, stop_ids)
        if self.cache == "static":
            session.config.cache_implementation = "static"
        session.config.disable_compile = not self.compile
        return session


class _Grammar(LogitsProcessor):
    """Restricts the rows inside an open zoom action to the action grammar; records each step's sets."""

    def __init__(self, request: TurnRequest, prompt_len: int, pieces: Pieces):
        self.request, self.prompt_len, self.pieces = request, prompt_len, pieces
        self.texts = [""] * len(request.limits)
        self.applied: list[dict[int, Tensor]] = []  # per step {row: ids}

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] > self.prompt_len:
            self.texts = [x + self.pieces(int(t)) for x, t in zip(self.texts, input_ids[:, -1].tolist())]
        allowed = self.request.allowed(list(range(len(self.texts))), self.texts)
        self.applied.append(allowed)
        return restrict(scores, (torch.tensor(list(allowed)),), list(allowed.values())) if allowed else scores


class _NoiseSampling(LogitsProcessor):
    """Makes greedy `generate` emit medvr's inverse-CDF sample: every other token's score is set to -inf."""

    def __init__(self, noise: Noise, slots: Tensor, offsets: Tensor, prompt_len: int, temperature, forbidden):
        self.noise, self.slots, self.offsets = noise, slots, offsets
        self.prompt_len, self.temperature, self.forbidden = prompt_len, temperature, forbidden

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.prompt_len
        logp = policy_logprobs(scores, self.temperature, self.forbidden)
        try:
            token = choose(logp, self.noise.at(self.slots, self.offsets + step))
        except FloatingPointError as err:
            raise NonFiniteError(f"the policy's logits are not finite while sampling ({err})") from err
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token.unsqueeze(-1), 0.0)


class _HFSession:
    def __init__(self, model, processor, temperature, greedy, noise, stop_strings, forbidden_ids, stop_ids):
        self.model, self.processor = model, processor
        self.temperature, self.greedy, self.noise = temperature, greedy, noise
        self.stop_strings = stop_strings
        self.forbidden = torch.tensor(forbidden_ids, dtype=torch.long)
        self.config = generation_config(
            max_new_tokens=1, stop_ids=stop_ids, pad_id=processor.tokenizer.pad_token_id, forbidden_ids=forbidden_ids,
        )
        self.pieces = Pieces(processor.tokenizer)

    def turn(self, rows: list, request: TurnRequest, resume=None) -> list[TurnOutput]:
        """One synchronous `generate` call; `resume` (continuous batching across turns) is not supported here."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in history_batch(rows, self.processor.tokenizer.pad_token_id).items()}
        self.config.max_new_tokens = max(request.limits)
        processors = LogitsProcessorList()
        grammar = None
        if request.grammar is not None:
            grammar = _Grammar(request, inputs["input_ids"].shape[1], self.pieces)
            processors.append(grammar)
        if not self.greedy:
            processors.append(_NoiseSampling(
                self.noise, request.slots, torch.tensor(request.offsets), inputs["input_ids"].shape[1],
                self.temperature, self.forbidden.to(device),
            ))
        out = sample(self.model, inputs, self.config, self.temperature, stop_strings=self.stop_strings,
                     tokenizer=self.processor.tokenizer, logits_processor=processors,
                     allowed=grammar.applied if grammar else None)
        turns = []
        for r in range(len(rows)):
            n = int(out.mask[r].sum())
            ended = "action" if out.stopped_by_string[r] else ("budget" if out.truncated[r] else "eos")
            if n > request.limits[r]:
                n, ended = request.limits[r], "budget"
            allowed = {t: step[r] for t, step in enumerate(grammar.applied[:n]) if r in step} if grammar else {}
            turns.append(TurnOutput(out.tokens[r, :n].cpu(), out.logps[r, :n].cpu(), out.entropies[r, :n].cpu(), ended,
                                    allowed=allowed))
        if request.watch is not None:
            self._replay(turns, request)
        return turns

    def _replay(self, turns: list[TurnOutput], request: TurnRequest) -> None:
        """Step the trigger watch over the finished turn; cut each row where it fires."""
        width = max(len(x.tokens) for x in turns)
        texts = [""] * len(turns)
        cut = [-1] * len(turns)
        for t in range(width):
            live = [r for r, x in enumerate(turns) if cut[r] < 0 and t < len(x.tokens)]
            if not live:
                break
            allowed = torch.tensor([request.eligible[r] and t >= request.min_tokens and window_open(texts[r])
                                    for r in live])
            entropies = torch.stack([turns[r].entropies[t] for r in live])
            fire = request.watch.step(torch.tensor(live), entropies, allowed)
            for r, f in zip(live, fire.tolist()):
                if f:
                    cut[r] = t
                else:
                    texts[r] += self.pieces(int(turns[r].tokens[t]))
        for r, c in enumerate(cut):
            if c < 0:
                continue
            x = turns[r]
            cont = TurnOutput(x.tokens, x.logps, x.entropies, x.ended, allowed=x.allowed) if request.fork else None
            turns[r] = TurnOutput(x.tokens[:c], x.logps[:c], x.entropies[:c], "trigger",
                                  trigger_entropy=float(x.entropies[c]), continuation=cont,
                                  allowed={t: ids for t, ids in x.allowed.items() if t < c})


def history_batch(rows: list, pad_id: int) -> dict[str, Tensor]:
    """Left-padded model inputs of the running rows' whole histories, their images in row then turn order."""
    ids = [t.all_ids() for t in rows]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id, padding_side="left"),
        "attention_mask": pad_sequence(
            [torch.ones_like(i) for i in ids], batch_first=True, padding_value=0, padding_side="left"
        ),
        "mm_token_type_ids": pad_sequence(
            [t.all_mm() for t in rows], batch_first=True, padding_value=0, padding_side="left"
        ),
        "pixel_values": torch.cat([p for t in rows for p in t.pixels]),
        "image_grid_thw": torch.stack([g for t in rows for g in t.grids]),
    }
