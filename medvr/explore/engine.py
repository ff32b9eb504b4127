"""The multi-turn rollout engine behind every explore option (none, tool, evr, random_crop).

All B*G trajectories advance together: one batched turn of the rollout engine (`rollout=`
group, medvr/rollout/engines.py) over the rows still running, then per-row bookkeeping (no model
call inside a per-sample loop). A turn ends at a stop token, at `</zoom>` (the environment
answers with a crop observation) or at a trigger (EVR / random_crop stop the row there and force
a zoom). Each trajectory is one row of prompt, policy, forced and observation tokens; only policy
tokens have loss mask 1.
"""

from __future__ import annotations

import bisect

import torch

from medvr.explore.grammar import ActionGrammar
from medvr.explore.trajectory import Trajectory, Zoom, assemble
from medvr.explore.zoom import ACTION_CLOSE, ACTION_OPEN, ZoomEnv
from medvr.prompts import PromptBuilder
from medvr.rollout.batch import Rollouts
from medvr.rollout.encode import encode_prompts, stop_token_ids, vision_token_ids
from medvr.rollout.engines import HFGenerate, TurnOutput, TurnRequest
from medvr.rollout.sampling import Noise


def _token_index(pieces: list[str], markers: tuple[str, ...], last: bool = False) -> int | None:
    """Index of the token where the first (or last) occurrence of any marker starts, from per-token texts."""
    text = "".join(pieces)
    found = [(text.rfind(m) if last else text.find(m)) for m in markers]
    found = [i for i in found if i >= 0]
    if not found:
        return None
    char = max(found) if last else min(found)
    ends = list(_cumulative(pieces))
    return bisect.bisect_right(ends, char)


def _cumulative(pieces: list[str]):
    total = 0
    for p in pieces:
        total += len(p)
        yield total


class MultiTurn:
    """Rollouts with an optional zoom tool (`max_turns` > 0) and an optional forced trigger."""

    def __init__(
        self,
        max_new_tokens: int,
        max_turns: int = 0,
        max_total_tokens: int | None = None,
        system: str | None = None,
        env: ZoomEnv | None = None,
        trigger=None,
        trigger_at_eval: bool = False,
        mask_over_turn: bool = False,
        constrain_actions: bool = False,
        engine=None,
    ):
        if max_turns > 0 and env is None:
            raise ValueError("explore.max_turns > 0 needs explore.env (the zoom environment)")
        if trigger is not None and max_turns < 1:
            raise ValueError("explore.trigger needs explore.max_turns >= 1 (a trigger forces a zoom)")
        self.max_new_tokens = max_new_tokens
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.system = system
        self.env = env
        self.trigger = trigger
        self.trigger_at_eval = trigger_at_eval
        self.mask_over_turn = mask_over_turn
        self.engine = engine if engine is not None else HFGenerate()  # rollout=: how a turn is decoded
        self.constrain_actions = constrain_actions  # decode zoom actions under their grammar (explore/grammar.py)
        self._grammar: ActionGrammar | None = None  # built for the first tokenizer seen, rebuilt for another

    # --- public --------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        model,
        processor,
        prompt: PromptBuilder,
        records: list[dict],
        *,
        group_size: int,
        temperature: float,
        greedy: bool = False,
    ) -> Rollouts:
        device = next(model.parameters()).device
        trigger = self.trigger if (not greedy or self.trigger_at_eval) else None
        branch = trigger is not None and trigger.branch and not greedy
        if branch and group_size % 2:
            raise ValueError(f"explore.trigger.branch needs an even algo.group_size, got {group_size}")
        roots = group_size // 2 if branch else group_size
        enc = encode_prompts(processor, prompt, records, roots, system=self.system)
        trajs = Trajectory.from_prompts(enc, [r for r in records for _ in range(roots)])
        for slot, t in enumerate(trajs):
            t.slot = slot
        # one uniform number per (trajectory, policy token): the same rollouts on every engine
        noise = None if greedy else Noise(len(trajs) * (2 if branch else 1), self.max_new_tokens)
        forbidden = vision_token_ids(processor)
        session = self.engine.session(
            model, processor, temperature=temperature, greedy=greedy, noise=noise,
            stop_strings=[ACTION_CLOSE] if self.max_turns > 0 else None,
            forbidden_ids=forbidden, stop_ids=stop_token_ids(processor),
        )
        vocab = model.config.get_text_config().vocab_size - len(forbidden)
        grammar = None
        if self.constrain_actions and self.max_turns > 0:
            if self._grammar is None or self._grammar.tokenizer is not processor.tokenizer:
                self._grammar = ActionGrammar(processor.tokenizer)
            grammar = self._grammar
        first_turn = True
        try:
            while active := [t for t in trajs if not t.done]:
                for t in active:
                    if t.policy_tokens >= self.max_new_tokens:  # budget spent (e.g. just before a forced action)
                        _finish(t, True, processor.tokenizer)
                if not (active := [t for t in active if not t.done]):
                    break
                fork = branch and first_turn
                request = self._request(active, trigger, noise, vocab, fork, grammar)
                resume = None if fork else self._resumer(active, processor, trigger, noise)
                turns = session.turn(active, request, resume=resume)  # None: the row's last turn went to `resume`
                if fork:  # keep an un-regrounded twin right after every root: the group contrasts both
                    twins = [t.copy() for t in active]
                    for i, (twin, turn) in enumerate(zip(twins, turns)):
                        twin.can_trigger = False
                        twin.slot = len(trajs) + i  # its later turns draw their own numbers
                        if turn.continuation is not None:
                            turns[i] = [turn, turn.continuation]
                        else:
                            turns[i] = [turn, turn]
                    trajs = active = [x for pair in zip(active, twins) for x in pair]
                    turns = [x for pair in turns for x in pair]
                pending = [(t, turn) for t, turn in zip(active, turns) if turn is not None]
                observations = [self._advance(t, turn, processor.tokenizer, trigger, noise) for t, turn in pending]
                self._observe(processor, [(t, o) for (t, _), o in zip(pending, observations) if o is not None])
                first_turn = False
        finally:
            for t in trajs:
                t.cache = None  # engine state (KV caches) does not outlive the rollout
        if self.mask_over_turn:
            for t in trajs:
                t.masked = t.over_turn
        return assemble(trajs, processor.tokenizer.pad_token_id, group_size, device)

    def stats(self, rollouts: Rollouts) -> dict[str, float]:
        """train/explore/* metrics of one batch of trajectories."""
        zooms = rollouts.extras.get("zooms", [[] for _ in range(len(rollouts))])
        n = max(len(zooms), 1)
        forced = [z for row in zooms for z in row if z.forced]
        entropies = [z.entropy for z in forced if z.entropy is not None]
        out = {
            "zooms_per_rollout": sum(len(row) for row in zooms) / n,
            "trigger_rate": sum(any(z.forced for z in row) for row in zooms) / n,
            "invalid_actions": sum(z.error is not None for row in zooms for z in row) / n,
            "turns": sum(1 + len(row) for row in zooms) / n,
        }
        if entropies:
            out["entropy_at_trigger"] = sum(entropies) / len(entropies)
        return out

    # --- one turn --------------------------------------------------------------------------------
    def _eligible(self, t: Trajectory, trigger) -> bool:
        """May the trigger cut this row in its next turn?"""
        return (not t.in_action and t.can_trigger and t.triggers < trigger.max_triggers
                and len(t.zooms) < self.max_turns)

    def _resumer(self, active: list[Trajectory], processor, trigger, noise):
        """The engine's `resume` callback: book the turns that just ended at an action or a trigger and say
        which rows start their next turn at once (continuous batching, where the engine supports it).

        A row the trigger may still cut waits for the next synchronous turn: a quantile trigger's threshold
        is shared by the rows of a turn, so those rows must start that turn together (the same rollouts as
        rollout=hf). Every other row goes on at once with its new budget, offset and open action.
        """

        def resume(ended: list[tuple[int, object]]) -> list[tuple[int, int, int, str]]:
            pairs = [(active[r], turn) for r, turn in ended]
            observations = [self._advance(t, turn, processor.tokenizer, trigger, noise) for t, turn in pairs]
            self._observe(processor, [(t, o) for (t, _), o in zip(pairs, observations) if o is not None])
            again = []
            for (r, _), (t, _) in zip(ended, pairs):
                if not t.done and t.policy_tokens >= self.max_new_tokens:
                    _finish(t, True, processor.tokenizer)
                if t.done or (trigger is not None and self._eligible(t, trigger)):
                    continue
                again.append((r, self.max_new_tokens - t.policy_tokens, t.policy_tokens, _lead(t)))
            return again

        return resume

    def _request(self, active: list[Trajectory], trigger, noise, vocab: int, fork: bool, grammar) -> TurnRequest:
        """Budgets, noise rows, the action grammar and the trigger's turn watch for the running rows."""
        slots = torch.tensor([t.slot for t in active])
        request = TurnRequest(
            limits=[self.max_new_tokens - t.policy_tokens for t in active],
            offsets=[t.policy_tokens for t in active],
            slots=slots,
            fork=fork,
        )
        if grammar is not None:  # a turn opens inside an action only after a forced `<zoom>[`
            request.grammar = grammar
            request.leads = [_lead(t) for t in active]
            request.frames = [self.env.frame(*t.record["image"].size) for t in active]
        if trigger is not None:
            request.watch = trigger.watch(slots, noise if noise is not None else Noise(len(active), 1), vocab)
            request.min_tokens = trigger.min_tokens
            request.eligible = [self._eligible(t, trigger) for t in active]
        return request

    def _advance(self, t: Trajectory, turn: TurnOutput, tokenizer, trigger, noise) -> tuple[Zoom, object] | None:
        """Append this turn to the row; return a pending zoom (action text span) for the environment."""
        start = t.length
        t.cache = turn.state
        t.add_policy(turn.tokens, turn.logps, turn.entropies, tokenizer, turn.allowed)
        tokens = turn.tokens
        if turn.ended == "trigger" and t.can_trigger:
            t.triggers += 1
            entropy = turn.trigger_entropy
            if trigger.writes_box:
                image = t.record["image"]
                draws = noise.box[t.slot] if noise is not None else None
                box = self.env.from_pixels(trigger.box(*image.size, draws=draws), *image.size)
                action = f"{ACTION_OPEN}[{box[0]}, {box[1]}, {box[2]}, {box[3]}]{ACTION_CLOSE}"
                span_start = t.length
                t.add_forced(tokenizer(action, add_special_tokens=False)["input_ids"], action)
                return self._zoom(t, Zoom(action, span=(span_start, t.length), forced=True, entropy=entropy))
            prefix = f"{ACTION_OPEN}["
            t.pending = Zoom(prefix, span=(t.length, t.length), forced=True, entropy=entropy)
            t.add_forced(tokenizer(prefix, add_special_tokens=False)["input_ids"], prefix)
            t.in_action = True
            return None
        if turn.ended == "action":
            if t.pending is not None:
                zoom, t.pending = t.pending, None
            else:
                pieces = tokenizer.batch_decode(tokens.unsqueeze(1))
                at = _token_index(pieces, (ACTION_OPEN,), last=True) or 0
                zoom = Zoom("", span=(start + at, start + at), forced=False)
            zoom.span = (zoom.span[0], t.length)
            zoom.action = tokenizer.decode(t.all_ids()[zoom.span[0] : zoom.span[1]])
            t.in_action = False
            return self._zoom(t, zoom)
        _finish(t, turn.ended == "budget", tokenizer)
        return None

    def _zoom(self, t: Trajectory, zoom: Zoom):
        if len(t.zooms) >= self.max_turns:  # one zoom too many: cut by the turn limit
            t.done, t.truncated, t.over_turn = True, True, True
            return None
        obs = self.env.step(zoom.action, t.record["image"])
        zoom.box, zoom.error = obs.box, obs.error
        return zoom, obs

    def _observe(self, processor, pending: list) -> None:
        """Encode every pending observation in one processor call and append it to its row."""
        if not pending:
            return
        obs = [o for _, (_, o) in pending]
        images = [o.image for o in obs if o.image is not None]
        enc = processor(
            text=[o.text for o in obs], images=images or None, padding=True, padding_side="left", return_tensors="pt"
        )
        patches = enc["image_grid_thw"].prod(-1).tolist() if images else []
        pixel_chunks = iter(torch.split(enc["pixel_values"], patches)) if images else iter(())
        grids = iter(enc["image_grid_thw"]) if images else iter(())
        for r, (t, (zoom, o)) in enumerate(pending):
            keep = enc["attention_mask"][r].bool()
            ids, mm = enc["input_ids"][r][keep], enc["mm_token_type_ids"][r][keep]
            if self.max_total_tokens is not None and t.length - t.prompt_len + len(ids) > self.max_total_tokens:
                t.done, t.truncated = True, True  # no room for the observation: cut by the token budget
                t.zooms.append(zoom)
                continue
            image = (next(pixel_chunks), next(grids)) if o.image is not None else None
            t.add_observation(ids, mm, image, o.image)
            t.zooms.append(zoom)


def _lead(t: Trajectory) -> str:
    """The open action a row's next turn starts inside: the forced `<zoom>[` waiting for its box, else none."""
    return t.pending.action if t.in_action else ""


def _finish(t: Trajectory, truncated: bool, tokenizer) -> None:
    """End a trajectory; a forced action still waiting for its box counts as an invalid zoom."""
    if t.pending is not None:
        zoom, t.pending = t.pending, None
        zoom.span = (zoom.span[0], t.length)
        zoom.action = tokenizer.decode(t.all_ids()[zoom.span[0] : zoom.span[1]])
        zoom.error = f"the zoom action was not closed with {ACTION_CLOSE}"
        t.zooms.append(zoom)
    t.done, t.truncated = True, truncated
