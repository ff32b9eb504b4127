"""End to end on the tiny model: parameters move, the reference stays put, MLflow holds the run."""

from __future__ import annotations

import logging
import os

import mlflow
import pytest
import torch
from hydra.utils import instantiate

from conftest import FAST_MODEL, SMALL_DATA, compose_cfg
from medvr.models.spec import half_precision_trainable
from medvr.module import GRPOModule
from medvr.train import run

QUICK = [
    *FAST_MODEL,
    *SMALL_DATA,
    "data.batch_size=2",
    "explore.max_new_tokens=32",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "callbacks.rollout_samples.every_n_steps=1",
    "optimizer.lr=1e-3",
]


def test_two_steps_change_the_policy_and_log_everything(tmp_path, cache_dir):
    cfg = compose_cfg(QUICK, tmp_path, cache_dir)
    metrics = run(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the logger's export does not leak into the next job

    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.tags["reward"] == "r1" and found.data.tags["model"] == "tiny"
    assert found.data.tags["explore"] == "none" and found.data.tags["seed"] == "0"
    expected = [
        "train/loss", "train/reward", "train/reward/accuracy", "train/reward/format", "train/reward_std",
        "train/kl", "train/completion_length", "val/acc", "val/format", "test/acc",
    ]
    for key in expected:
        assert key in found.data.metrics, key
    assert any(k.startswith("val/acc/") for k in found.data.metrics)
    rewards = client.get_metric_history(found.info.run_id, "train/reward")
    assert len(rewards) == 2 and all(0.0 <= m.value <= 2.0 for m in rewards)
    val = client.get_metric_history(found.info.run_id, "val/acc")
    assert [m.step for m in val] == [0, 2]  # before training and at the end
    assert found.data.params["algo/beta"] == "0.3"  # algo=grpo_demo, the default
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"config.yaml", "rollouts", "plots"} <= artifacts
    config_text = (tmp_path / "config.yaml")
    config_text.write_text(open(client.download_artifacts(found.info.run_id, "config.yaml")).read())
    assert "group_size: 4" in config_text.read_text()
    pages = [a.path for a in client.list_artifacts(found.info.run_id, "rollouts")]
    page = open(client.download_artifacts(found.info.run_id, pages[0])).read()
    assert "data:image/png;base64," in page and "&lt;answer&gt;" in page and "reward=" in page


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_module_updates_trainable_weights_and_keeps_reference_frozen(precision, tmp_path, cache_dir):
    """Also with fp32 master weights and bf16 compute (trainer.precision=bf16-mixed): the weights stay fp32."""
    import lightning as L

    cfg = compose_cfg(QUICK, tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    module = GRPOModule(model=instantiate(cfg.model), **parts)
    assert all(not k.startswith("_frozen_ref") for k in module.state_dict())
    before = {k: v.clone() for k, v in module.policy.named_parameters()}
    ref_before = {k: v.clone() for k, v in module._frozen_ref[0].named_parameters()}
    datamodule = instantiate(cfg.data)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, precision=precision,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    changed = [k for k, v in module.policy.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)  # full fine-tuning: (almost) every tensor got a gradient
    assert all(torch.equal(v, ref_before[k]) for k, v in module._frozen_ref[0].named_parameters())
    assert trainer.global_step == 2


def test_weights_trained_in_16_bits_are_warned_about(tmp_path, cache_dir, caplog):
    cfg = compose_cfg([*QUICK, "model.dtype=bfloat16"], tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    module = GRPOModule(model=instantiate(cfg.model), **parts)
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    assert half_precision_trainable(module.policy) == {torch.bfloat16: trainable}
    with caplog.at_level(logging.WARNING, logger="medvr.module"):
        module.configure_optimizers()
    (warning,) = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert f"{trainable:,} trainable parameters" in warning and "optimizer.lr=0.001" in warning
    assert "model.dtype=float32 trainer.precision=bf16-mixed" in warning
    frozen = torch.nn.Linear(2, 2).to(torch.bfloat16).requires_grad_(False)
    assert half_precision_trainable(frozen) == {}  # a frozen 16-bit part (a LoRA base) is not a concern


def test_kl_is_zero_at_step_zero(tmp_path, cache_dir, tiny):
    cfg = compose_cfg(QUICK, tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    module = GRPOModule(model=instantiate(cfg.model), **parts)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    rollouts = module.explore.rollout(
        module.policy, module.processor, module.prompt, batch, group_size=4, temperature=1.0
    )
    _, ref = module._fixed_logps(rollouts)
    from medvr.rollout.generate import token_logps

    logps, _ = token_logps(module.policy, rollouts, 1.0, module.forbidden_ids)
    mask = rollouts.loss_mask.bool()
    assert torch.allclose(ref[mask], logps[mask], atol=1e-6)
