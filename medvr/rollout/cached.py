"""`rollout=cached`: medvr's own decode loop over a KV cache, for rollouts at GPU grade.

What it saves over `rollout=hf` (HF `generate` per turn over the whole history):
- each prompt is prefilled once and its cache repeated for its G samples, and each image goes
  through the vision tower once (`medvr/rollout/images.py`);
- a row stops the step its trigger fires (the forced action follows at once) and leaves the
  decode batch when it stops for any reason: no token is decoded to be thrown away;
- a row that zooms keeps its cache: the next turn appends the forced tokens and the observation
  (its image encoded once) instead of re-encoding the history;
- a row whose turn ends at an action or a trigger starts its next turn at once, rejoining the running
  batch, instead of waiting for the turn's slowest row (continuous batching across turns); only a
  row a trigger may still cut waits, since a quantile trigger's threshold is shared by a turn's rows.
Rows of a turn can hold caches of different lengths: they are left-padded into one batch cache,
and the appended segments are left-padded after them, so a row's cache may have masked holes.
Positions are passed explicitly (M-RoPE of each segment, offset by the row's next position), so
the holes change nothing: the log-probs equal the training forward's (tests/test_rollout_engines.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from medvr.explore.triggers import window_open
from medvr.rollout.engines import Pieces, TurnOutput, TurnRequest, ends_with_stop
from medvr.rollout.generate import NonFiniteError
from medvr.rollout.images import base_model, cache_argument, encode_unique
from medvr.rollout.sampling import choose, entropy, policy_logprobs


@dataclass
class RowCache:
    """A trajectory's cached history between turns (padding removed)."""

    keys: list[Tensor]  # per layer [heads, length, head_dim]
    values: list[Tensor]
    length: int  # the trajectory's tokens held (its history minus any token not yet forwarded)
    images: int  # the trajectory's images already encoded
    next_pos: int  # M-RoPE position of the next token


class CachedDecoder:
    """Config: `rollout=cached`. `continuous=false` keeps turns synchronous (every row waits for its turn's
    slowest row before its next turn starts): the same rollouts, more decode steps; for comparison."""

    name = "cached"

    def __init__(self, continuous: bool = True):
        self.continuous = continuous

    def session(self, model, processor, *, temperature, greedy, noise, stop_strings, forbidden_ids, stop_ids):
        return _Session(model, processor, temperature, greedy, noise, stop_strings or [], forbidden_ids, stop_ids,
                        self.continuous)


class _Session:
    def __init__(self, model, processor, temperature, greedy, noise, stop_strings, forbidden_ids, stop_ids,
                 continuous):
        self.model = model
        self.continuous = continuous
        self.inner = base_model(model).model  # the Qwen-VL model: rope index, image features
        self.device = next(model.parameters()).device
        self.pad_id = processor.tokenizer.pad_token_id
        self.temperature, self.greedy, self.noise = temperature, greedy, noise
        self.stop_strings = stop_strings
        self.forbidden = torch.tensor(forbidden_ids, dtype=torch.long, device=self.device)
        self.stop_ids = set(stop_ids)
        self.pieces = Pieces(processor.tokenizer)
        self.cache_key = cache_argument(model)

    # --- one turn ------------------------------------------------------------------------------
    def turn(self, rows: list, request: TurnRequest, resume=None) -> list[TurnOutput]:
        """Each row's output of this turn (of its last turn, for rows that went on through `resume`; None for a
        row whose last turn was handed to `resume`, which booked it).

        `resume(ended)`, when given, is called with [(row, TurnOutput)] of the rows whose turn just ended at
        an action or a trigger; it does the multi-turn bookkeeping and returns [(row, limit, offset, lead)]
        of those that go on at once: their appended segment is prefilled and they rejoin the running batch
        (continuous batching across turns) instead of waiting for the slowest row of this turn.
        """
        resume = resume if self.continuous else None
        n = len(rows)
        cache, mask, next_pos, logits = self._extend(rows)
        held = [r.length for r in rows]  # trajectory tokens in the cache, per row
        active = list(range(n))  # batch position -> row
        out: list[dict] = [self._fresh() for _ in rows]
        texts = [""] * n
        results: list[TurnOutput | None] = [None] * n
        slots = request.slots.tolist()
        while active:
            steps = [len(out[r]["tokens"]) for r in active]  # per row: its tokens so far in its turn
            grammar = request.allowed(active, [texts[r] for r in active])  # {batch position: ids}
            logp = policy_logprobs(logits, self.temperature, self.forbidden, grammar)  # [m, V]
            h = entropy(logp)  # [m]
            fired = torch.zeros(len(active), dtype=torch.bool)
            # rows not cut yet (a forked row decodes on past its cut, as its continuation)
            if request.watch is not None and (watched := [b for b, r in enumerate(active) if results[r] is None]):
                allowed = torch.tensor([request.eligible[active[b]] and steps[b] >= request.min_tokens
                                        and window_open(texts[active[b]]) for b in watched])
                ids = torch.tensor([active[b] for b in watched])
                fired[watched] = request.watch.step(ids, h[watched].cpu(), allowed)
            uniforms = None
            if not self.greedy:
                index = torch.tensor([request.offsets[r] + k for r, k in zip(active, steps)])
                uniforms = self.noise.at(torch.tensor([slots[r] for r in active]), index)
            try:
                tokens = choose(logp, uniforms)  # [m]
            except FloatingPointError as err:
                raise NonFiniteError(f"the policy's logits are not finite while sampling ({err})") from err
            token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            # per-row values as Python numbers at once: one transfer, not three per row
            token_ids, token_logps, entropies, cut = tokens.tolist(), token_logp.tolist(), h.tolist(), fired.tolist()
            keep, ended = [], []  # batch positions decoding on; (row, output) of turns ended at an action/trigger
            for b, r in enumerate(active):
                if cut[b] and results[r] is None:  # cut here; a forked row decodes on as the continuation
                    results[r] = self._output(out[r], "trigger", self._stash(cache, mask, b, held[r], rows[r], next_pos[b]))
                    results[r].trigger_entropy = entropies[b]
                    if not request.fork:
                        ended.append((r, results[r]))
                        continue
                token = token_ids[b]
                if b in grammar:
                    out[r]["allowed"][len(out[r]["tokens"])] = grammar[b]
                out[r]["tokens"].append(token)
                out[r]["logps"].append(token_logps[b])
                out[r]["entropies"].append(entropies[b])
                piece = self.pieces(token)
                stop = None
                if token in self.stop_ids:
                    stop = "eos"
                elif self.stop_strings and ends_with_stop(texts[r], piece, self.stop_strings):
                    stop = "action"
                elif len(out[r]["tokens"]) >= request.limits[r]:
                    stop = "budget"
                texts[r] += piece
                if stop is None:
                    keep.append(b)
                    continue
                state = self._stash(cache, mask, b, held[r], rows[r], next_pos[b]) if stop == "action" else None
                self._finish(results, r, out[r], stop, state)
                if stop == "action" and results[r].continuation is None:
                    ended.append((r, results[r]))
            for r in (active[b] for b in keep):
                held[r] += 1  # the token sampled this step is forwarded below
            if keep and len(keep) < len(active):  # rows stopped: they leave the batch
                index = torch.tensor(keep, device=self.device, dtype=torch.long)
                cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
            active = [active[b] for b in keep]
            if keep:
                mask = torch.cat([mask, torch.ones(len(keep), 1, dtype=mask.dtype, device=self.device)], dim=1)
                logits = self._forward(tokens.unsqueeze(1), mask, next_pos.view(1, -1, 1).expand(3, -1, 1), cache)
                next_pos = next_pos + 1
            again = []
            if resume is not None and ended:
                again = resume(ended)
                for r, _ in ended:  # booked by `resume`: a row that goes on returns its later turn, the rest None
                    results[r] = None
            if again:  # rows whose next turn starts now: prefill what was appended and rejoin the batch
                for r, limit, offset, lead in again:
                    request.limits[r], request.offsets[r] = limit, offset
                    if request.watch is not None:  # resumed rows are past their triggers
                        request.eligible[r] = False
                    if request.grammar is not None:
                        request.leads[r] = lead
                    out[r], texts[r], held[r] = self._fresh(), "", rows[r].length
                parts = self._extend([rows[r] for r, *_ in again])
                if active:
                    cache, mask, next_pos, logits = _join((cache, mask, next_pos, logits), parts)
                else:
                    cache, mask, next_pos, logits = parts
                active += [r for r, *_ in again]
        return results

    @staticmethod
    def _fresh() -> dict:
        return {"tokens": [], "logps": [], "entropies": [], "allowed": {}}

    def _finish(self, results: list, r: int, out: dict, ended: str, state) -> None:
        final = self._output(out, ended, state)
        if results[r] is None:
            results[r] = final
        else:  # a forked row: the cut turn is recorded, this is its continuation
            results[r].continuation = final

    @staticmethod
    def _output(out: dict, ended: str, state) -> TurnOutput:
        return TurnOutput(
            torch.tensor(out["tokens"], dtype=torch.long),
            torch.tensor(out["logps"], dtype=torch.float32),
            torch.tensor(out["entropies"], dtype=torch.float32),
            ended,
            state=state,
            allowed=dict(out["allowed"]),
        )

    # --- caches --------------------------------------------------------------------------------
    def _stash(self, cache: DynamicCache, mask: Tensor, b: int, held: int, row, next_pos: Tensor) -> RowCache:
        """Row `b` of the batch cache, padding removed, to carry into the row's next turn."""
        valid = mask[b].bool()
        return RowCache(
            keys=[layer.keys[b][:, valid] for layer in cache.layers],
            values=[layer.values[b][:, valid] for layer in cache.layers],
            length=held,
            images=len(row.grids),
            next_pos=int(next_pos),
        )

    def _extend(self, rows: list):
        """Batch cache of the rows' kept histories plus what was appended since: (cache, mask, next_pos, logits).

        Rows without a cache (the first turn) are prefilled from their prompt; rows with the same
        prompt (the G samples of a record) are prefilled once and their cache repeated.
        """
        states = [getattr(t, "cache", None) for t in rows]
        # rows sharing a record and an empty cache share their prefill
        keys = [(id(t.record), t.length) if s is None else ("row", i) for i, (t, s) in enumerate(zip(rows, states))]
        unique: dict = {}
        for i, key in enumerate(keys):
            unique.setdefault(key, i)
        firsts = list(unique.values())
        expand = torch.tensor([firsts.index(unique[key]) for key in keys], device=self.device)
        cache, mask, next_pos, logits = self._prefill([rows[i] for i in firsts], [states[i] for i in firsts])
        if len(firsts) != len(rows):
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[expand], layer.values[expand]
            mask, next_pos, logits = mask[expand], next_pos[expand], logits[expand]
        for t in rows:
            t.cache = None  # consumed: the batch cache holds it now
        return cache, mask, next_pos, logits

    def _prefill(self, rows: list, states: list):
        n = len(rows)
        # old part: stashed caches, left-padded to a common length
        old_len = max((s.keys[0].shape[1] if s is not None else 0) for s in states)
        layers = len(self.inner.language_model.layers)
        kv = []
        if old_len:
            for layer in range(layers):
                ks, vs = [], []
                for s in states:
                    k = s.keys[layer] if s is not None else None
                    v = s.values[layer] if s is not None else None
                    ks.append(_left_pad(k, old_len, like=states))
                    vs.append(_left_pad(v, old_len, like=states))
                kv.append((torch.stack(ks), torch.stack(vs)))
        old_mask = torch.zeros(n, old_len, dtype=torch.long, device=self.device)
        for i, s in enumerate(states):
            if s is not None:
                old_mask[i, old_len - s.keys[0].shape[1]:] = 1
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache(config=base_model(self.model).config)
        # new part: every token and image of the row not yet in its cache
        seg_ids = [t.all_ids()[(s.length if s else 0):] for t, s in zip(rows, states)]
        seg_mm = [t.all_mm()[(s.length if s else 0):] for t, s in zip(rows, states)]
        first_image = [s.images if s else 0 for s in states]
        ids = pad_sequence(seg_ids, batch_first=True, padding_value=self.pad_id, padding_side="left").to(self.device)
        mm = pad_sequence(seg_mm, batch_first=True, padding_value=0, padding_side="left").to(self.device)
        seg_mask = pad_sequence([torch.ones_like(s) for s in seg_ids], batch_first=True, padding_value=0,
                                padding_side="left").to(self.device)
        pixels = [p for t, f in zip(rows, first_image) for p in t.pixels[f:]]
        grids = [g for t, f in zip(rows, first_image) for g in t.grids[f:]]
        grid = torch.stack(grids).to(self.device) if grids else None
        pos, _ = self.inner.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=seg_mask)
        offset = torch.tensor([s.next_pos if s else 0 for s in states], device=self.device)
        pos = pos + offset.view(1, -1, 1)  # [3, n, Lg]
        next_pos = pos.masked_fill(seg_mask.unsqueeze(0) == 0, -1).amax(dim=(0, 2)) + 1  # [n]
        extra = {}
        if grids:
            image_ids = torch.tensor([id(p) for p in pixels])
            extra = encode_unique(self.model, torch.cat(pixels).to(self.device), grid, image_ids)
        mask = torch.cat([old_mask, seg_mask], dim=1)
        logits = self._forward(ids, mask, pos, cache, **extra)
        return cache, mask, next_pos, logits

    @torch.no_grad()
    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache: DynamicCache, **extra) -> Tensor:
        """Logits [n, V] of the last position after appending `ids` to `cache` (updated in place)."""
        extra.pop("image_grid_thw", None)  # positions are given: the grids only served M-RoPE
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_key: cache}, **extra)
        return out.logits[:, -1].float()


def _join(running: tuple, joining: tuple) -> tuple:
    """Two decode batches (cache, mask [m, L], next_pos [m], logits [m, V]) as one: the shorter cache is
    left-padded (masked), the joining rows go after the running ones."""
    (cache, mask, pos, logits), (cache2, mask2, pos2, logits2) = running, joining
    width = max(mask.shape[1], mask2.shape[1])
    pad = lambda x, dim: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - dim) + (width - x.shape[dim], 0))
    for layer, other in zip(cache.layers, cache2.layers):
        layer.keys = torch.cat([pad(layer.keys, 2), pad(other.keys, 2)])
        layer.values = torch.cat([pad(layer.values, 2), pad(other.values, 2)])
    return cache, torch.cat([pad(mask, 1), pad(mask2, 1)]), torch.cat([pos, pos2]), torch.cat([logits, logits2])


def _left_pad(x: Tensor | None, length: int, like: list) -> Tensor:
    """[heads, l, d] -> [heads, length, d], zeros on the left (masked)."""
    ref = next(s.keys[0] for s in like if s is not None)
    if x is None:
        return ref.new_zeros(ref.shape[0], length, ref.shape[2])
    return torch.nn.functional.pad(x, (0, 0, length - x.shape[1], 0))
