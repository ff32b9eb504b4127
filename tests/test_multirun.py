"""`python train.py -m ...` in a subprocess: one MLflow run per job, a failing job is FAILED and the sweep goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import FAST_MODEL, SMALL_DATA
from medvr.report import build_report

ROOT = Path(__file__).resolve().parents[1]


def _sweep(tmp_path, cache_dir, *params: str) -> subprocess.CompletedProcess:
    """`python train.py -m <params>` with one quick step per job, outputs under tmp_path."""
    cmd = [
        sys.executable, "train.py", "-m", *params,
        f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
        *FAST_MODEL, *SMALL_DATA,
        "data.batch_size=2", "explore.max_new_tokens=24", "trainer.max_steps=1",
        "trainer.val_check_interval=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "validate_before_training=false", "test_after_training=false", "eval_samples=0",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_multirun_records_every_job_and_survives_a_failure(tmp_path, cache_dir):
    # job 0 fails (an invalid algo.loss_type), jobs 1..3 must still run
    out = _sweep(tmp_path, cache_dir, "algo.loss_type=ppo,grpo", "reward=accuracy,r1")
    assert out.returncode != 0, "a sweep with a failed job must exit non-zero once every job ran"
    assert "algo.loss_type='ppo': expected one of" in out.stderr  # checked before the model loads

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    runs = [r for r in found if r.data.tags.get("sweep") != "true"]  # the jobs (children of the sweep's parent)
    assert len(found) == len(runs) + 1
    assert len(runs) == 4
    by_status: dict[str, list] = {}
    for r in runs:
        by_status.setdefault(r.info.status, []).append(r)
    assert len(by_status["FAILED"]) == 2 and len(by_status["FINISHED"]) == 2
    for r in by_status["FAILED"]:
        assert r.data.params["algo/loss_type"] == "ppo"
        assert "loss_type" in r.data.tags["error"]
    for r in by_status["FINISHED"]:
        assert r.data.params["algo/loss_type"] == "grpo"
        assert "train/reward" in r.data.metrics and "val/acc" in r.data.metrics
    assert {r.data.tags["reward"] for r in by_status["FINISHED"]} == {"accuracy", "r1"}
    names = {r.info.run_name for r in runs}
    assert len(names) == 4 and "accuracy-none-tiny-grpo_demo-algo.loss_type=ppo-s0" in names
    # one Hydra job directory per job
    assert len(list((tmp_path / "multiruns").glob("*/*/[0-9]"))) == 4

    # the sweep's parent holds the report of the finished jobs, though a job failed (its end runs at exit)
    (parent,) = [r for r in found if r.data.tags.get("sweep") == "true"]
    assert "report_error" not in parent.data.tags, parent.data.tags.get("report_error")
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "2/4 finished"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/ablation.md", "report/ablation.csv", "report/curves_val_acc.png"} <= artifacts

    # the ablation report groups the finished runs by their option tags; run directories do not split them
    report = build_report(f"sqlite:///{tmp_path}/mlflow.db", "medvr", by=["reward"], metrics=["val/acc"])
    table = report.table
    assert sorted(table.index) == ["accuracy", "r1"] and table["runs"].tolist() == [1, 1]
    assert table["val/acc"].between(0, 1).all()
    assert report.formatted().loc["r1", "val/acc"] == f"{table.loc['r1', 'val/acc']:.3f} (n=1)"
