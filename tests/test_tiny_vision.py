"""The tiny build's vision pretraining: labels of each view, and a tower that learns from them."""

import copy
import random

import torch

from medvr.data import synthetic
from medvr.explore.zoom import ZoomEnv
from medvr.models.tiny_vision import MERGED, pretrain_vision, views


def _env():
    return ZoomEnv(box_scale=10, min_side=28, upscale=2.0, min_pixels=3136, max_pixels=12544,
                   observation="", invalid_observation="", image_factor=28)


def test_views_label_the_lesion_tokens_and_the_quadrant(tiny):
    _, processor, _ = tiny
    items = synthetic.generate(12, seed=0, split="warmstart")
    data = views(items, processor, _env(), jitter=0.3, rng=random.Random(0))
    assert len(data) == 2 * len(items)
    for item, whole, crop in zip(items, data[0::2], data[1::2]):
        _, gh, gw = whole["grid"][0].tolist()
        rows, cols = gh // 2, gw // 2
        assert whole["lesion"].shape == whole["where"].shape == (rows * cols,)
        # the token holding the lesion box's centre is a lesion token
        (x1, y1, x2, y2), (w, h) = item.record["bbox"], item.record["image"].size
        cx, cy = (x1 + x2) / 2 * gw * 14 / w, (y1 + y2) / 2 * gh * 14 / h
        assert whole["lesion"][int(cy // MERGED) * cols + int(cx // MERGED)] == 1
        assert 1 <= whole["lesion"].sum() <= 4  # the lesion spans at most 2 x 2 tokens at the whole-image budget
        assert whole["quadrant"] == synthetic.QUADRANTS.index(item.facts["quadrant"])
        assert set(whole["where"].tolist()) == {0, 1, 2, 3}
        # the crop shows the lesion over more tokens, and has no quadrant label
        assert crop["lesion"].sum() >= whole["lesion"].sum() and crop["quadrant"] == -100
        assert set(crop["where"].tolist()) == {-100}
        for view in (whole, crop):
            assert view["shape"] == synthetic.SHAPES.index(item.facts["shape"])
            assert view["count"] == item.facts["count"] - 1


def test_pretraining_trains_the_tower_and_lowers_the_probe_loss(tiny):
    model, processor, _ = tiny
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    text_before = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    data = views(synthetic.generate(16, seed=0, split="warmstart"), processor, _env(), 0.3, random.Random(0))
    torch.manual_seed(0)
    losses = pretrain_vision(model, data, steps=40, batch_size=16, lr=3e-3, seed=0)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    after = model.model.visual.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert torch.equal(text_before, model.model.language_model.layers[0].mlp.up_proj.weight)  # the tower alone


def test_warm_start_weighs_the_answer_letter_and_only_policy_tokens(tiny):
    from medvr.models.tiny_build import _batches, _demonstration

    _, processor, prompt = tiny
    tok = processor.tokenizer
    items = synthetic.generate(3, seed=0, split="warmstart")
    demos = [_demonstration(it, prompt, processor, None, {"rate": 0.0}, random.Random(0)) for it in items]
    open_id = tok.convert_tokens_to_ids("<answer>")
    ((enc, weights),) = _batches(demos, 8, tok.pad_token_id, open_id, 4.0)
    ids = enc["input_ids"]
    for row, item in zip(range(len(items)), items):
        letter_at = (ids[row, :-1] == open_id).nonzero()[-1, 0].item()  # the prompt's format line names it too
        assert tok.decode(ids[row, letter_at + 1]) == item.record["answer"]
        assert weights[row, letter_at + 1] == 4.0
        policy = weights[row] > 0
        assert tok.decode(ids[row][policy]).startswith("<think>")  # the prompt weighs nothing
        assert set(weights[row][policy].tolist()) == {1.0, 4.0} and (weights[row] == 4.0).sum() == 1


def test_warm_start_loss_reads_the_weighted_positions_and_encodes_a_frozen_tower_once(tiny):
    """Stage 2's loss, computed only where tokens weigh and from pre-encoded images, equals the plain
    weighted cross-entropy over the full logits; with the tower frozen, the loop never runs it."""
    import torch.nn.functional as F

    from medvr.models.tiny_build import _batches, _demonstration, _encoded, _fit, _loss, _zoom_env

    model, processor, prompt = tiny
    model = copy.deepcopy(model)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    tok = processor.tokenizer
    env = _zoom_env(processor, prompt, {"zoom": {"min_side": 28, "upscale": 2.0}},
                    {"box_scale": 10, "pixels": [3136, 12544]})
    items = synthetic.generate(6, seed=0, split="warmstart")
    rng = random.Random(0)
    demos = [_demonstration(it, prompt, processor, env if i % 2 else None, {"rate": 1.0, "jitter": 0.3}, rng)
             for i, it in enumerate(items)]
    batches = _batches(demos, 4, tok.pad_token_id, tok.convert_tokens_to_ids("<answer>"), 4.0)
    assert sorted(len(enc["image_grid_thw"]) for enc, _ in batches) == [3, 6]  # plain rows, and zooms with a crop each
    with torch.no_grad():
        for enc, weights in batches:
            logits = model(**enc).logits[:, :-1]
            nll = F.cross_entropy(logits.transpose(1, 2), enc["input_ids"][:, 1:], reduction="none")
            expected = (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()
            assert torch.allclose(_loss(model, _encoded(model, enc), weights), expected, atol=1e-5)
    calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    layer = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    _fit(model, batches, steps=4, lr=1e-3, stage="test")
    hook.remove()
    assert len(calls) == len(batches)  # once per batch, before the loop: not once per step
    assert not torch.equal(layer, model.model.language_model.layers[0].mlp.up_proj.weight)
