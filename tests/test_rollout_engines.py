"""rollout=cached against rollout=hf: the same rollouts for a seed, exact log-probs, and the work it saves.

The cached engine must be an optimisation only: identical tokens on every explore option, sampling
log-probs equal to the training forward's, each prompt prefilled once, each image encoded once, no
token decoded after a row stops, and the history of a zooming row never re-encoded.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from medvr.data import synthetic
from medvr.explore.engine import MultiTurn
from medvr.rollout.batch import Rollouts
from medvr.rollout.cached import CachedDecoder
from medvr.rollout.encode import vision_token_ids
from medvr.rollout.engines import HFGenerate
from medvr.rollout.generate import token_logps
from tests.conftest import FAST_MODEL, compose_cfg

OPTIONS = {
    "none": [],
    "tool": [],
    "evr": [],  # quantile mode: rows the trigger may still cut wait for the next synchronous turn
    "evr_branch": ["explore.trigger.branch=true"],  # forked rows (turns stay synchronous)
    "random_crop": [],
}

# the test model (a short warm start) zooms in some samples only: under this seed its tool rollouts of the
# records below hold 6 zooms in 12 rows (seed 1 held none after the tokenizer learned the tool's words). The
# engines' logits agree to ~1e-6, not bit for bit, so a uniform that lands that close to a boundary of the
# inverse CDF can draw different tokens: under seed 3 one evr row drew a token of probability 6e-6 and its
# neighbour in the vocabulary, one on each engine
ZOOMING_SEED = 2


@pytest.fixture(scope="module")
def records():
    return [it.record for it in synthetic.generate(6, seed=5, split="test")][:3]


def _explore(option: str, tmp_path, cache_dir) -> MultiTurn:
    name = option.split("_")[0] if option != "random_crop" else option
    cfg = compose_cfg([*FAST_MODEL, f"explore={name}", *OPTIONS[option]], tmp_path, cache_dir)
    return instantiate(cfg.explore)


def _rollout(explore: MultiTurn, engine, tiny, records, seed: int, group_size: int = 4) -> Rollouts:
    model, processor, prompt = tiny
    explore.engine = engine
    torch.manual_seed(seed)
    return explore.rollout(model, processor, prompt, records, group_size=group_size, temperature=1.0)


def _assert_exact(model, processor, rollouts: Rollouts) -> None:
    forbidden = torch.tensor(vision_token_ids(processor))
    logps, entropies = token_logps(model, rollouts, 1.0, forbidden, with_entropy=True)
    mask = rollouts.loss_mask.bool()
    assert mask.sum() > 20
    torch.testing.assert_close(logps[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(entropies[mask], rollouts.entropies[mask], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cached_engine_gives_the_hf_rollouts_with_exact_logps(option, tiny, records, tmp_path, cache_dir):
    model, processor, _ = tiny
    explore = _explore(option, tmp_path, cache_dir)
    hf = _rollout(explore, HFGenerate(), tiny, records, seed=ZOOMING_SEED)
    cached = _rollout(explore, CachedDecoder(), tiny, records, seed=ZOOMING_SEED)
    assert cached.completions == hf.completions
    assert torch.equal(cached.input_ids, hf.input_ids) and torch.equal(cached.loss_mask, hf.loss_mask)
    torch.testing.assert_close(cached.gen_logps, hf.gen_logps, atol=1e-4, rtol=0)
    assert explore.stats(cached) == pytest.approx(explore.stats(hf), abs=1e-4)
    _assert_exact(model, processor, cached)
    if option != "none":
        assert explore.stats(cached)["zooms_per_rollout"] > 0  # the option really zoomed
    other = _rollout(explore, CachedDecoder(), tiny, records, seed=ZOOMING_SEED + 1)
    assert other.completions != cached.completions  # the seed matters


def test_static_cache_gives_the_dynamic_cache_rollouts(tiny, records, tmp_path, cache_dir):
    """rollout=hf rollout.cache=static (HF's StaticCache; compiled on a GPU): the same zooming rollouts, exact log-probs."""
    model, processor, _ = tiny
    explore = _explore("tool", tmp_path, cache_dir)
    static = _rollout(explore, HFGenerate(cache="static"), tiny, records, seed=ZOOMING_SEED)
    dynamic = _rollout(explore, HFGenerate(), tiny, records, seed=ZOOMING_SEED)
    assert static.completions == dynamic.completions and explore.stats(static)["zooms_per_rollout"] > 0
    torch.testing.assert_close(static.gen_logps, dynamic.gen_logps, atol=1e-4, rtol=0)
    _assert_exact(model, processor, static)
    with pytest.raises(ValueError, match="rollout.cache='paged'"):
        HFGenerate(cache="paged")


def test_greedy_decoding_agrees(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    explore = _explore("tool", tmp_path, cache_dir)
    out = {}
    for engine in (HFGenerate(), CachedDecoder()):
        explore.engine = engine
        out[engine.name] = explore.rollout(model, processor, prompt, records, group_size=1, temperature=1.0, greedy=True)
    assert out["cached"].completions == out["hf"].completions


class _Calls:
    """Forward hooks recording the vision tower's patches and the language model's input shapes."""

    def __init__(self, model):
        inner = model.model
        self.patches: list[int] = []
        self.text: list[tuple[int, int]] = []
        self.handles = [
            inner.visual.register_forward_hook(lambda m, args, out: self.patches.append(args[0].shape[0])),
            inner.language_model.register_forward_hook(
                lambda m, args, kwargs, out: self.text.append(tuple(kwargs["inputs_embeds"].shape[:2])),
                with_kwargs=True,
            ),
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_one_prefill_per_prompt_one_encoding_per_image_and_no_wasted_token(tiny, records, tmp_path, cache_dir):
    model = tiny[0]
    explore = _explore("none", tmp_path, cache_dir)
    with _Calls(model) as calls:
        ro = _rollout(explore, CachedDecoder(), tiny, records, seed=0)
    images = sum(int(g.prod()) for g in ro.image_grid_thw[:: 4])  # one copy of each prompt's image
    assert calls.patches == [images]  # the vision tower ran once, on the 3 distinct images
    assert calls.text[0][0] == len(records)  # the prefill: 3 prompts, not 12 rows
    decoded = [rows for rows, length in calls.text[1:]]
    assert all(length == 1 for _, length in calls.text[1:])
    # every forwarded token is a kept policy token (not the last one of its row, which is never forwarded):
    # finished rows left the batch, nothing was decoded to be discarded
    assert sum(decoded) == int(ro.loss_mask.sum()) - len(ro)
    assert decoded == sorted(decoded, reverse=True) and decoded[-1] < decoded[0]


def test_a_trigger_stops_the_row_and_turns_reuse_the_cache(tiny, records, tmp_path, cache_dir):
    model = tiny[0]
    explore = _explore("random_crop", tmp_path, cache_dir)
    with _Calls(model) as calls:
        ro = _rollout(explore, CachedDecoder(), tiny, records, seed=0)
    zooms = explore.stats(ro)["zooms_per_rollout"]
    assert zooms > 0
    prefills = [(rows, length) for rows, length in calls.text if length > 1]
    prompt_len = int((ro.loss_mask.float().argmax(1) - (ro.attention_mask == 0).sum(1)).min())
    first, later = prefills[0], prefills[1:]
    assert first[0] == len(records) and later
    # a later turn prefills only what was appended (forced action + observation), never the history again
    assert all(length < prompt_len for _, length in later)
    # decode steps forward only tokens that were kept: policy tokens minus each turn's last one (never forwarded)
    decoded = sum(rows for rows, length in calls.text if length == 1)
    policy = int(ro.loss_mask.sum())
    assert decoded <= policy


def test_token_logps_encodes_each_image_once_and_trains_the_vision_tower(tiny, records, tmp_path, cache_dir):
    model, processor, _ = tiny
    explore = _explore("none", tmp_path, cache_dir)
    ro = _rollout(explore, CachedDecoder(), tiny, records, seed=0)
    forbidden = torch.tensor(vision_token_ids(processor))
    visual = list(model.model.visual.parameters())

    def grads(rollouts):
        model.zero_grad(set_to_none=True)
        logps, _ = token_logps(model, rollouts, 1.0, forbidden)
        (logps * rollouts.loss_mask).sum().backward()
        return [p.grad.clone() for p in visual]

    with _Calls(model) as calls:
        once = grads(ro)
    assert calls.patches == [sum(int(g.prod()) for g in ro.image_grid_thw[::4])]
    every = grads(Rollouts(**{**ro.__dict__, "image_ids": None}))  # each row's copy encoded separately
    model.zero_grad(set_to_none=True)
    assert any(g.abs().sum() > 0 for g in once)
    for a, b in zip(once, every):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option", ["tool", "evr"])
def test_rows_start_their_next_turn_at_once(option, tiny, records, tmp_path, cache_dir):
    """Continuous batching across turns: a row that zooms rejoins the running batch with its next turn, so
    the rollouts equal the synchronous turns' and fewer decode steps run (no row waits for a turn's slowest)."""
    model = tiny[0]
    explore = _explore(option, tmp_path, cache_dir)
    steps, out = {}, {}
    for continuous in (False, True):
        with _Calls(model) as calls:
            out[continuous] = _rollout(explore, CachedDecoder(continuous=continuous), tiny, records, seed=4, group_size=6)
        steps[continuous] = sum(1 for _, length in calls.text if length == 1)  # decode forwards
    sync, cont = out[False], out[True]
    assert cont.completions == sync.completions and torch.equal(cont.input_ids, sync.input_ids)
    torch.testing.assert_close(cont.gen_logps, sync.gen_logps, atol=1e-4, rtol=0)
    _assert_exact(model, tiny[1], cont)
    assert explore.stats(sync)["zooms_per_rollout"] > 0
    assert steps[True] < steps[False], steps
