"""Sampling-time log-probs equal the training forward's, on a left-padded batch of mixed image sizes."""

from __future__ import annotations

import torch
from PIL import Image

from medvr.data import synthetic
from medvr.explore.engine import MultiTurn
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
