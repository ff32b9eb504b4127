"""Grids through submitit: the sbatch script of hydra/launcher=medvr_slurm, and `-m hydra/launcher=submitit_local`
running each grid point as a job in its own process, the jobs children of one parent run."""

from __future__ import annotations

import os

import mlflow
import pytest
from hydra.utils import instantiate

from conftest import compose_cfg
from test_multirun import _sweep

# submitit's local executor: what hydra/launcher=submitit_slurm does on a cluster, minus sbatch; the time
# limit also ends the job processes if the test's own timeout kills the launching process first
LOCAL = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]


def _parent_and_children(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in found]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(found) == len(children) + 1, "every job must be a child of the sweep's parent run"
    return client, parents[0], children


def test_medvr_slurm_submits_one_array_of_one_gpu_jobs(tmp_path, monkeypatch):
    """The sbatch script that hydra/launcher=medvr_slurm submits, caught by a stand-in `sbatch` that refuses it."""
    bin_dir, script = tmp_path / "bin", tmp_path / "submitted.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "sbatch: refused by the test" >&2\nexit 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit >= 1.5.4 refuses a machine without srun
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = compose_cfg(["hydra/launcher=medvr_slurm", "hydra.launcher.partition=gpu"], tmp_path, tmp_path / "cache")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Exception, match="refused by the test"):
        launcher.launch([["reward=accuracy"], ["reward=r1"]], initial_job_idx=0)
    flags = {line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")}
    assert {"--array=0-1%2", "--partition=gpu", "--gpus-per-node=1", "--ntasks-per-node=1", "--cpus-per-task=8",
            "--mem=64GB", "--time=1440", "--signal=TERM@300"} <= flags
    (output,) = [f for f in flags if f.startswith("--output=")]  # the job logs, under the sweep dir
    assert output.startswith(f"--output={tmp_path}/multiruns/") and output.endswith("/.submitit/%A_%a/%A_%a_0_log.out")


@pytest.mark.slow
def test_submitit_local_runs_a_grid_as_children_of_one_parent_and_records_failed_jobs(tmp_path, cache_dir, tiny):
    # `tiny` builds the model into cache_dir first: the jobs' time goes to training, not to that build.
    # Job 1's invalid algo.loss_type fails it right after its run is opened, before the model loads.
    out = _sweep(tmp_path, cache_dir, *LOCAL, "algo.loss_type=grpo,ppo")
    assert out.returncode != 0, "a sweep with a failed job must exit non-zero"

    client, parent, children = _parent_and_children(tmp_path)
    by_loss = {r.info.run_name.split("loss_type=")[1].split("-")[0]: r for r in children}  # a job's run name holds its swept key, under submitit too
    assert sorted(by_loss) == ["grpo", "ppo"]
    done, failed = by_loss["grpo"], by_loss["ppo"]
    assert done.info.status == "FINISHED" and "val/acc" in done.data.metrics
    assert failed.info.status == "FAILED" and "loss_type" in failed.data.tags["error"]

    # each job ran under submitit, in its own folder under the sweep dir, with its own logs
    (sweep_dir,) = (tmp_path / "multiruns").glob("*/*")
    logs = {p.parent.name: p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.out")}
    assert len(logs) == 2, sorted(p.name for p in sweep_dir.glob(".submitit/*/*"))
    assert sum(f"MLflow run {done.info.run_id}" in text for text in logs.values()) == 1  # printed last    assert sorted(p.name for p in sweep_dir.glob("[0-9]")) == ["0", "1"]  # Hydra's job dirs

    # the sweep's end ran in the launching process: the report of the finished job on the parent, the failed
    # one listed; a parent with one finished job is FINISHED
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "1/2 finished"
    report = client.download_artifacts(parent.info.run_id, "report/ablation.md", str(tmp_path / "got"))
    assert "grpo" in open(report).read()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/ablation.csv", "report/curves_val_acc.png"} <= artifacts
    listed = open(client.download_artifacts(parent.info.run_id, "failed_jobs.md", str(tmp_path / "got"))).read()
    assert f"`{failed.info.run_name}` FAILED" in listed and done.info.run_name not in listed
