"""Differential test: medvr's training-forward log-probs and entropies against TRL's GRPOTrainer.

TRL's `_get_per_token_logps_and_entropies` is called unbound on a stand-in holding the only attribute
it reads (`accelerator`), with the model patched by TRL's own `add_fused_lm_head`, as GRPOTrainer does
in `__init__`. The batch is a real rollout: left padding, images of different sizes, and TRL chunks it
into micro-batches, slicing pixel rows per sample itself. TRL forbids no tokens, so the exact
comparison uses none; medvr's vision-token ban is checked separately as a pure renormalisation.
"""

from __future__ import annotations

import copy
import types
from contextlib import nullcontext

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from medvr.explore.engine import MultiTurn
from medvr.rollout.encode import vision_token_ids
from medvr.rollout.generate import token_logps
from test_logprobs import _mixed_size_records

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def batch(tiny):
    model, processor, prompt = tiny
    records = _mixed_size_records(3)
    torch.manual_seed(0)
    rollouts = MultiTurn(max_new_tokens=24).rollout(
        model, processor, prompt, records, group_size=2, temperature=TEMPERATURE
    )
    assert (rollouts.attention_mask[:, 0] == 0).any(), "the batch should be left-padded"
    assert len({tuple(t.tolist()) for t in rollouts.image_grid_thw}) > 1, "image grids should differ"
    return rollouts


def trl_logps_and_entropies(model, rollouts, micro_batch: int):
    """[N, K] log-probs and entropies of the last K = completion-width tokens, computed by TRL."""
    fused = copy.deepcopy(model)  # add_fused_lm_head patches `forward` on the instance it gets
    add_fused_lm_head(fused, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    stand_in = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=nullcontext, is_main_process=True))
    with torch.no_grad():
        logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            stand_in,
            fused,
            rollouts.input_ids,
            rollouts.attention_mask,
            logits_to_keep=rollouts.input_ids.shape[1] - rollouts.policy_start,
            batch_size=micro_batch,
            compute_entropy=True,
            pixel_values=rollouts.pixel_values,
            image_grid_thw=rollouts.image_grid_thw,
            num_images=rollouts.images_per_row.tolist(),
            mm_token_type_ids=rollouts.mm_token_type_ids,
        )
    return logps, entropies


def test_token_logps_and_entropies_equal_trl(tiny, batch):
    model = tiny[0]
    trl_logps, trl_entropies = trl_logps_and_entropies(model, batch, micro_batch=2)
    keep = trl_logps.shape[1]
    no_ban = torch.empty(0, dtype=torch.long)
    with torch.no_grad():
        logps, entropies = token_logps(model, batch, TEMPERATURE, no_ban, with_entropy=True)  # [N, L]
    mask = batch.loss_mask[:, -keep:].bool()  # [N, K] completion tokens
    assert batch.loss_mask[:, :-keep].sum() == 0 and mask.sum() > 20
    torch.testing.assert_close(logps[:, -keep:][mask], trl_logps[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropies[:, -keep:][mask], trl_entropies[mask], atol=1e-5, rtol=0)
    assert (trl_logps[mask] < 0).all() and (trl_entropies[mask] > 0).all()


def test_vision_token_ban_only_renormalises(tiny, batch):
    """With the ban, each log-prob rises by -log(1 - p(banned tokens)) >= 0 over TRL's (medvr rollout/generate.py)."""
    model, processor, _ = tiny
    trl_logps, _ = trl_logps_and_entropies(model, batch, micro_batch=len(batch))
    keep = trl_logps.shape[1]
    banned = torch.tensor(vision_token_ids(processor))
    with torch.no_grad():
        logps, _ = token_logps(model, batch, TEMPERATURE, banned)
    mask = batch.loss_mask[:, -keep:].bool()
    shift = logps[:, -keep:][mask] - trl_logps[mask]
    assert (shift >= -1e-6).all()
    assert shift.max() < 0.05  # the warm-started policy puts little mass on vision tokens
