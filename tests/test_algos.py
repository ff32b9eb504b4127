"""Every algo option trains on the tiny model; mu, beta, dynamic sampling and entropy credit do what they say."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import FAST_MODEL, SMALL_DATA, compose_cfg
from hydra.utils import instantiate

from medvr.credit import entropy_credit, loss_mask, micro_weight
from medvr.module import GRPOModule
from medvr.rollout.batch import Rollouts

BASE = [*FAST_MODEL, *SMALL_DATA, "data.batch_size=2", "explore.max_new_tokens=24", "optimizer.lr=1e-3"]


def _module(tmp_path, cache_dir, overrides):
    cfg = compose_cfg([*BASE, *overrides], tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    return GRPOModule(model=instantiate(cfg.model), **parts), instantiate(cfg.data)


def _fit(module, datamodule, steps=2):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_each_algo_option_trains(algo, tmp_path, cache_dir):
    module, datamodule = _module(tmp_path, cache_dir, [f"algo={algo}"])
    assert bool(module._frozen_ref) == (module.algo.beta > 0)  # beta 0 builds no reference model
    before = {k: v.clone() for k, v in module.policy.named_parameters()}
    trainer = _fit(module, datamodule)
    # gspo reuses each batch twice: two optimiser steps per training batch
    assert trainer.global_step == 2
    changed = sum(not torch.equal(v, before[k]) for k, v in module.policy.named_parameters())
    assert changed > 0.9 * len(before)


def test_old_logps_only_when_reused_and_ref_only_with_kl(tmp_path, cache_dir):
    module, datamodule = _module(tmp_path, cache_dir, ["algo.num_iterations=1", "algo.beta=0"])
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    rollouts = module.explore.rollout(module.policy, module.processor, module.prompt, batch, group_size=4, temperature=1.0)
    assert module._fixed_logps(rollouts) == (None, None)
    module.algo = type(module.algo)(**{**module.algo.__dict__, "num_iterations": 2})
    old, ref = module._fixed_logps(rollouts)
    assert ref is None and old.shape == rollouts.input_ids.shape
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(old[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)


def _fake_rollouts(entropies: torch.Tensor, truncated: list[bool]) -> Rollouts:
    n, length = entropies.shape
    ones = torch.ones(n, length, dtype=torch.long)
    return Rollouts(
        input_ids=ones, attention_mask=ones, mm_token_type_ids=ones * 0, loss_mask=ones,
        gen_logps=entropies * 0, entropies=entropies, truncated=torch.tensor(truncated),
        pixel_values=torch.zeros(0, 4), image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
        images_per_row=torch.zeros(n, dtype=torch.long), completions=[""] * n, group_size=2,
    )


def test_dynamic_sampling_and_truncation_masks():
    rollouts = _fake_rollouts(torch.rand(6, 3), truncated=[False, True, False, False, False, False])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, float("nan")])  # group 1 has equal rewards
    mask = loss_mask(rollouts.loss_mask, rollouts.truncated, rewards, 2, mask_truncated=True, dynamic_sampling=True)
    assert mask.sum(1).tolist() == [3, 0, 0, 0, 3, 3]
    kept = loss_mask(rollouts.loss_mask, rollouts.truncated, rewards, 2, mask_truncated=False, dynamic_sampling=False)
    assert kept.sum().item() == 18


def test_top_entropy_quantile_zeroes_advantages_of_low_entropy_tokens():
    entropies = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.3, 0.7, 0.4]])
    mask = torch.ones(2, 4)
    credit, kept = entropy_credit(torch.tensor([2.0, -1.0]), entropies, mask, rho=0.25)
    # the top 25% of 8 tokens by entropy: 0.9 and 0.8
    assert credit.tolist() == [[0.0, 2.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    assert kept == 0.25
    assert entropy_credit(torch.tensor([2.0, -1.0]), entropies, mask, rho=1.0)[0].tolist() == [2.0, -1.0]


def test_micro_batch_weights_add_up_to_the_full_batch():
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        shares = [micro_weight(mask, lo, lo + 2, loss_type) for lo in (0, 2)]
        assert sum(shares) == pytest.approx(1.0)
    assert [micro_weight(mask, lo, lo + 2, "bnpo") for lo in (0, 2)] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert micro_weight(mask, 0, 2, "dapo") == 1.0  # each micro-batch loss is already over the batch's tokens


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, cache_dir):
    grads = []
    for flag in ("false", "true"):
        module, datamodule = _module(tmp_path, cache_dir, [f"model.gradient_checkpointing={flag}", "algo.beta=0"])
        assert module.policy.is_gradient_checkpointing == (flag == "true")
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        torch.manual_seed(0)
        rollouts = module.explore.rollout(module.policy.eval(), module.processor, module.prompt, batch, group_size=4, temperature=1.0)
        module.policy.train()
        from medvr.rollout.generate import token_logps

        logps, _ = token_logps(module.policy, rollouts, 1.0, module.forbidden_ids)
        (logps * rollouts.loss_mask).sum().backward()
        grads.append({k: p.grad.clone() for k, p in module.policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)
