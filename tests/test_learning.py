"""End to end: GRPO on a world where the key is a simple function of the image raises test accuracy,
and the policy's answers stay spread over the letters (issue 13's collapse onto one letter fails it)."""

from __future__ import annotations

import mlflow
import pytest
from conftest import FAST_MODEL, compose_cfg

from medvr.train import run

STEPS = 60


@pytest.mark.slow
def test_grpo_learns_to_read_the_modality_and_does_not_collapse(tmp_path, cache_dir):
    overrides = [
        *FAST_MODEL,
        # the modality decides the key's letter (MRI A, CT B, X-ray C; D is never right)
        "data.source.question_types=[modality]",
        "data.source.n_train=256", "data.source.n_val=8", "data.source.n_test=48",
        "algo=grpo", "data.batch_size=4", "algo.group_size=4", "optimizer.lr=5e-4",
        f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "validate_before_training=false", "test_before_training=true", "test_after_training=true", "eval_samples=0",
    ]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    run(cfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    history = lambda key: [m.value for m in sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)]
    (before, after) = history("test/acc")
    (spread_before, spread_after) = history("test/answer/top_share")
    assert after >= before + 0.15, (before, after)
    # measured: the starting policy gives one letter to all 48 items (accuracy 0.33). After 40 steps this
    # reached 0.60 until the build's stage 2 changed its numerics (same loss, logits only at weighted tokens;
    # medvr 96020a0), then 0.40: the start's lone letter is fragile, so the run takes 60 steps
    assert spread_after < cfg.collapse_share, (spread_before, spread_after)
