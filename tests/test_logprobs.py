"""Sampling-time log-probs equal the training forward's, on a left-padded batch of mixed image sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST_MODEL, compose_cfg
from hydra.utils import instantiate
from PIL import Image

from medvr.data import synthetic
from medvr.explore.engine import MultiTurn
from medvr.rollout import generate
from medvr.rollout.encode import vision_token_ids
from medvr.rollout.generate import token_logps


def _forbidden(processor) -> torch.Tensor:
    return torch.tensor(vision_token_ids(processor))


def _mixed_size_records(n: int) -> list[dict]:
    records, sizes = [], set()
    for item in synthetic.generate(64, seed=3, split="test"):
        if item.record["image"].size not in sizes:
            sizes.add(item.record["image"].size)
            records.append(item.record)
        if len(records) == n:
            break
    return records


def test_generation_logps_match_training_forward(tiny):
    model, processor, prompt = tiny
    records = _mixed_size_records(3)
    assert len({r["image"].size for r in records}) == 3
    # different question lengths -> different prompt lengths -> left padding
    torch.manual_seed(0)
    rollouts = MultiTurn(max_new_tokens=24).rollout(
        model, processor, prompt, records, group_size=2, temperature=1.0
    )
    assert (rollouts.attention_mask[:, 0] == 0).any(), "the batch should be left-padded"
    assert len({tuple(t.tolist()) for t in rollouts.image_grid_thw}) > 1, "image grids should differ"
    logps, entropies = token_logps(model, rollouts, 1.0, _forbidden(processor), with_entropy=True)
    mask = rollouts.loss_mask.bool()
    assert mask.sum() > 20
    torch.testing.assert_close(logps[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(entropies[mask], rollouts.entropies[mask], atol=1e-4, rtol=0)


def test_micro_batches_reproduce_the_full_batch(tiny):
    model, processor, prompt = tiny
    records = _mixed_size_records(2)
    rollouts = MultiTurn(max_new_tokens=16).rollout(model, processor, prompt, records, group_size=2, temperature=1.0)
    forbidden = _forbidden(processor)
    full, _ = token_logps(model, rollouts, 1.0, forbidden)
    parts = [token_logps(model, rollouts.rows(lo, lo + 1), 1.0, forbidden)[0] for lo in range(len(rollouts))]
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(torch.cat(parts)[mask], full[mask], atol=1e-4, rtol=0)


def test_multi_image_records_carry_every_image_through_rollout_and_training_forward(tiny):
    model, processor, prompt = tiny
    first, second, third = _mixed_size_records(3)
    records = [{**first, "extra_images": [second["image"], third["image"]]}, {**second, "extra_images": []}]
    text = processor.apply_chat_template(prompt.messages(records[0]), add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|>") == 3  # every image in the prompt, in order
    torch.manual_seed(0)
    rollouts = MultiTurn(max_new_tokens=16).rollout(model, processor, prompt, records, group_size=2, temperature=1.0)
    assert rollouts.images_per_row.tolist() == [3, 3, 1, 1]
    sizes = [r["image"].size for r in (first, second, third)]
    alone = [processor.image_processor(images=[Image.new("RGB", s)], return_tensors="pt")["image_grid_thw"][0]
             for s in sizes]
    assert [g.tolist() for g in rollouts.image_grid_thw[:3]] == [g.tolist() for g in alone]
    logps, _ = token_logps(model, rollouts, 1.0, _forbidden(processor))
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(logps[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)
    # the extra images change what the policy sees: the first row's prompt is longer than without them
    single = MultiTurn(max_new_tokens=1).rollout(model, processor, prompt, [first], group_size=1, temperature=1.0)
    assert rollouts.attention_mask[0].sum() > single.attention_mask[0].sum() + 1


def _rollouts(tiny, kind: str, tmp_path, cache_dir):
    """Rollouts of 3 records of mixed image sizes (left-padded prompts): single-turn (G=4), or zooming (G=2,
    random_crop: a crop after some rows' first policy tokens, trajectories right-aligned)."""
    model, processor, prompt = tiny
    torch.manual_seed(0)
    if kind == "single":
        explore, g = MultiTurn(max_new_tokens=24), 4
    else:
        overrides = [*FAST_MODEL, "explore=random_crop", "explore.trigger.rate=1.0", "explore.trigger.min_tokens=2"]
        explore, g = instantiate(compose_cfg(overrides, tmp_path, cache_dir).explore), 2
    return explore.rollout(model, processor, prompt, _mixed_size_records(3), group_size=g, temperature=1.0)


@pytest.mark.parametrize("kind", ["single", "zoom"])
def test_shared_prompt_forward_equals_the_full_forward_in_log_probs_and_gradients(kind, tiny, monkeypatch, tmp_path,
                                                                                  cache_dir):
    """token_logps runs each group's prompt once and its G rows on the repeated KV cache: the same log-probs
    and the same gradient as one forward over every row, also with crops after the prompt."""
    model, processor, _ = tiny
    rollouts = _rollouts(tiny, kind, tmp_path, cache_dir)
    g = rollouts.group_size
    assert (rollouts.attention_mask[:, 0] == 0).any() and len({tuple(x) for x in rollouts.image_grid_thw.tolist()}) > 1
    assert rollouts.images_per_row.max() == (1 if kind == "single" else 2)
    assert generate._shared_prompts(model, rollouts) is not None
    forbidden = _forbidden(processor)
    rows = []
    hook = model.model.language_model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))

    def run():
        model.zero_grad()
        logps, entropies = token_logps(model, rollouts, 1.0, forbidden, with_entropy=True)
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropies, grads

    shared, shared_entropies, shared_grads = run()
    assert rows == [3, 3 * g]  # the 3 prompts once, then every row from its first policy token on
    monkeypatch.setattr(generate, "_shared_prompts", lambda *a: None)
    full, full_entropies, full_grads = run()
    hook.remove()
    assert rows[2:] == [3 * g]
    mask = rollouts.loss_mask.bool()
    assert not shared[~mask].any() and not shared_entropies[~mask].any()
    torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_entropies[mask], full_entropies[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)  # sampling's
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_blocks_of_rows_that_mix_prompts_take_the_full_forward(tiny, tmp_path, cache_dir):
    model, _, _ = tiny
    rollouts = _rollouts(tiny, "zoom", tmp_path, cache_dir)
    assert generate._shared_prompts(model, rollouts) is not None
    rollouts.group_size = 3  # blocks of 3 rows would mix two prompts
    assert generate._shared_prompts(model, rollouts) is None
