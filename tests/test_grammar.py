"""explore.constrain_actions: zoom actions decoded under their grammar, with log-probs taken under it alike.

The grammar itself (which prefixes can still become a well-formed action in a frame) is checked as a
pure function; on the tiny model, constrained rollouts must close every action with a parsable,
positive-area box, agree between the two engines, and keep sampling log-probs equal to the training
forward's, which only holds because `token_logps` applies the recorded restrictions.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hydra.utils import instantiate

from medvr.data import synthetic
from medvr.explore.grammar import ActionGrammar, open_action, viable
from medvr.explore.zoom import parse_action
from medvr.rollout.cached import CachedDecoder
from medvr.rollout.encode import vision_token_ids
from medvr.rollout.engines import HFGenerate
from medvr.rollout.generate import token_logps
from medvr.rollout.sampling import policy_logprobs, restrict
from tests.conftest import FAST_MODEL, compose_cfg


@pytest.mark.parametrize("text", ["", "[", "[0", "[0, ", "[1, 2, 3, 4]</zoom>", "[9, 9, 1", "[9, 9, 10, 10]</",
                                  "[3, 4, 5, 6]", "[3, 4, 5, 6]</zo"])
def test_prefixes_of_well_formed_actions_are_viable(text):
    assert viable(text, 10, 10)


@pytest.mark.parametrize("text", [
    "x",  # no bracket
    "[01",  # leading zero
    "[10",  # x1 must leave room for x2 <= 10
    "[9, 9, 9",  # x2 must exceed x1 = 9: only 10 would, and 9 cannot grow into it
    "[1,2",  # separator is ", "
    "[5, 0, 5, ",  # x2 = x1: zero area
    "[1, 2, 3, 4, ",  # a fifth number
    "[1, 2, 3, 4] ",  # text before </zoom>
    "[1, 2, 3, 4]</zoom>x",  # text after the action
    "[1, 2, 3, 11",  # outside the frame
])
def test_malformed_or_empty_boxes_are_not(text):
    assert not viable(text, 10, 10)


def test_bounds_follow_the_frame_and_digits_can_grow():
    assert viable("[999, 0, 1000, 5]</zoom>", 1000, 1000)
    assert viable("[999, 0, 100", 1000, 1000)  # can become 1000
    assert not viable("[999, 0, 99", 1000, 1000)  # 99x < 1000: never above x1 = 999
    assert viable("[600, 0, 700", 640, 480) is False and viable("[600, 0, 64", 640, 480)  # a non-square frame
    assert not viable("[0, 480", 640, 480)  # y1 <= height - 1


def test_open_action_is_the_text_after_an_unclosed_zoom():
    assert open_action("I look <zoom>[1, 2") == "[1, 2"
    assert open_action("<zoom>[1, 2, 3, 4]</zoom> then") is None
    assert open_action("no action") is None


def test_allowed_tokens_on_the_tiny_tokenizer(tiny):
    tokenizer = tiny[1].tokenizer
    grammar = ActionGrammar(tokenizer)
    texts = lambda ids: {tokenizer.decode([i]) for i in ids.tolist()}
    after_open = texts(grammar.allowed("", (10, 10)))
    assert after_open and all("[".startswith(s) or s.startswith("[") for s in after_open)
    digits = texts(grammar.allowed("[", (10, 10)))
    assert "1" in digits and "0" in digits and all(viable("[" + s, 10, 10) for s in digits)
    closing = texts(grammar.allowed("[1, 2, 3, 4", (10, 10)))
    assert "]" in closing and "</zoom>" not in closing  # "]" must come first
    ending = texts(grammar.allowed("[1, 2, 3, 4]", (10, 10)))
    assert "</zoom>" in ending and all("</zoom>".startswith(s) for s in ending)
    assert grammar.allowed("[01", (10, 10)) is None  # already malformed: left unconstrained
    rows = grammar.step(["think <zoom>[", "no action", "<zoom>[1, 2, 3, 4]</zoom>"], [(10, 10)] * 3)
    assert list(rows) == [0]


def test_restrict_masks_only_the_listed_positions():
    logits = torch.zeros(2, 3, 5)
    restrict(logits, (torch.tensor([0, 1]), torch.tensor([2, 0])), [torch.tensor([1, 3]), torch.tensor([4])])
    assert torch.isinf(logits).sum() == 3 + 4
    assert torch.isfinite(logits[0, 2, [1, 3]]).all() and torch.isfinite(logits[1, 0, 4])
    assert torch.isfinite(logits[0, :2]).all() and torch.isfinite(logits[1, 1:]).all()
    logp = policy_logprobs(torch.zeros(2, 5), 1.0, torch.tensor([0]), {1: torch.tensor([2, 3])})
    torch.testing.assert_close(logp[1].exp(), torch.tensor([0, 0, 0.5, 0.5, 0]))
    torch.testing.assert_close(logp[0].exp(), torch.tensor([0, 0.25, 0.25, 0.25, 0.25]))


def _rollouts(option: str, engine, tiny, tmp_path, cache_dir, *extra: str):
    model, processor, prompt = tiny
    cfg = compose_cfg([*FAST_MODEL, f"explore={option}", *extra], tmp_path, cache_dir)
    explore = instantiate(cfg.explore)
    explore.engine = engine
    records = [it.record for it in synthetic.generate(8, seed=7, split="train")][:4]
    torch.manual_seed(3)
    return explore, explore.rollout(model, processor, prompt, records, group_size=4, temperature=1.0)


# forced `<zoom>[` (the quick test model rarely opens an action itself), and forked rows that decode on
@pytest.mark.parametrize("extra", [[], ["explore.trigger.branch=true"]], ids=["evr", "evr_branch"])
def test_constrained_actions_are_well_formed_and_their_logps_exact(extra, tiny, tmp_path, cache_dir):
    model, processor, _ = tiny
    _, cached = _rollouts("evr", CachedDecoder(), tiny, tmp_path, cache_dir, *extra)
    _, hf = _rollouts("evr", HFGenerate(), tiny, tmp_path, cache_dir, *extra)
    assert cached.completions == hf.completions
    torch.testing.assert_close(cached.gen_logps, hf.gen_logps, atol=1e-4, rtol=0)
    zooms = [z for row in cached.extras["zooms"] for z in row]
    # a `</zoom>` written with no action open ends the turn too; only opened actions are under the grammar
    closed = [z for z in zooms if z.action.startswith("<zoom>") and z.action.endswith("</zoom>")]
    assert len(closed) >= 4
    for z in closed:  # every closed action parses, lies in the 0..10 frame and has positive area
        x1, y1, x2, y2 = parse_action(z.action)
        assert 0 <= x1 < x2 <= 10 and 0 <= y1 < y2 <= 10 and z.error is None, z.action
    spots = sum(len(row) for row in cached.extras["allowed"])
    assert spots >= 3 * len(closed)  # at least the digits, separators and "]" of each box were constrained
    # each restricted token is a policy token, one of its allowed ids, written inside an open action
    tokenizer = processor.tokenizer
    for r, row in enumerate(cached.extras["allowed"]):
        start = int(cached.loss_mask[r].nonzero()[0])
        for col, ids in row:
            assert cached.loss_mask[r, col] == 1 and int(cached.input_ids[r, col]) in ids.tolist()
            assert open_action(tokenizer.decode(cached.input_ids[r, start:col])) is not None

    forbidden = torch.tensor(vision_token_ids(processor))
    mask = cached.loss_mask.bool()
    logps, _ = token_logps(model, cached, 1.0, forbidden)
    torch.testing.assert_close(logps[mask], cached.gen_logps[mask], atol=1e-4, rtol=0)
    # without the recorded restrictions the training forward would disagree on the action tokens
    unrestricted = replace(cached, extras={k: v for k, v in cached.extras.items() if k != "allowed"})
    free = token_logps(model, unrestricted, 1.0, forbidden)[0]
    assert (free[mask] - cached.gen_logps[mask]).abs().max() > 1e-2


def test_free_decoding_keeps_the_papers_behaviour(tiny, tmp_path, cache_dir):
    """explore.constrain_actions=false: no restriction recorded, and the tiny model writes malformed actions."""
    explore, free = _rollouts("evr", CachedDecoder(), tiny, tmp_path, cache_dir, "explore.constrain_actions=false")
    assert all(row == [] for row in free.extras["allowed"])
    assert explore.stats(free)["invalid_actions"] > 0
