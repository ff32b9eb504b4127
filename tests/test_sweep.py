"""A multirun is one MLflow parent run: jobs are its children, the report its artifacts; runs keep short params."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import mlflow
import pytest
import yaml
from mlflow.entities import Metric, Param

from conftest import compose_cfg
from medvr.report import CONFIG_ARTIFACT, build_report
from medvr.tracking.run import NOTE_TAG, PARENT_ENV, flat_config, make_logger, run_params
from medvr.tracking.sweep import SweepRun, failed_jobs, sweep_name, sweep_status
from test_multirun import _sweep


def test_params_are_the_short_list_and_the_swept_keys(tmp_path):
    cfg = compose_cfg(["algo.epsilon_low=0.3"], tmp_path, tmp_path / "cache")
    choices = {"reward": "r1", "explore": "none", "model": "tiny", "data": "synthetic", "algo": "grpo", "prompt": "r1"}
    params = run_params(cfg, choices, ["reward", "algo.epsilon_low"])
    assert params == {
        "reward": "r1", "explore": "none", "model": "tiny", "data": "synthetic", "algo": "grpo",
        "seed": "0", "optimizer/lr": "0.0003", "algo/group_size": "4", "algo/beta": "0.3", "algo/loss_type": "grpo",
        "algo/temperature": "1.0", "explore/max_new_tokens": "64", "trainer/max_steps": str(cfg.trainer.max_steps),
        "algo/epsilon_low": "0.3",
    }
    flat = flat_config(cfg)
    assert flat["model/warm_start/steps"] == str(cfg.model.warm_start.steps) and flat["algo/epsilon_low"] == "0.3"
    assert not any(k.startswith(("paths/", "hydra/")) for k in flat)


def test_sweep_name_status_and_failed_jobs():
    assert sweep_name("outputs/multiruns/2025-01-02/14-03-22", ["reward", "seed"]) == "sweep-14-03-22-reward,seed"
    assert sweep_name("outputs/multiruns/2025-01-02/14-03-22", []) == "sweep-14-03-22"
    assert sweep_status(["FINISHED", "FAILED"]) == "FINISHED"
    assert sweep_status(["FAILED", "FAILED"]) == sweep_status([]) == "FAILED"
    assert sweep_status(["FINISHED", "KILLED"]) == "KILLED"

    def run(name, status, **tags):
        return SimpleNamespace(info=SimpleNamespace(run_name=name, status=status), data=SimpleNamespace(tags=tags))

    text = failed_jobs([run("a", "FINISHED"), run("b", "FAILED", error="ValueError: bad\ntrace"), run("c", "KILLED")])
    assert text.splitlines()[2:] == ["- `b` FAILED: ValueError: bad", "- `c` KILLED: no error recorded"]


def test_report_compares_the_full_config_artifact_not_only_params(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("medvr", artifact_location=str(tmp_path / "artifacts"))
    for seed, eps in ((0, "0.2"), (1, "0.2"), (2, "0.3")):
        run = client.create_run(exp, tags={"reward": "r1", "explore": "none", "model": "tiny", "algo": "grpo"})
        client.log_batch(run.info.run_id, metrics=[Metric("test/acc", 0.5, 0, 0)], params=[Param("seed", str(seed))])
        config = {"seed": str(seed), "algo/epsilon_low": eps, "model/warm_start/steps": "100"}
        client.log_text(run.info.run_id, json.dumps(config), CONFIG_ARTIFACT)
        client.set_terminated(run.info.run_id)
    parent = client.create_run(exp, tags={"sweep": "true"})  # a sweep's parent is never an arm
    client.set_terminated(parent.info.run_id)
    table = build_report(uri).table
    assert table["config"].tolist() == ["algo/epsilon_low=0.2", "algo/epsilon_low=0.3"]
    assert table["runs"].tolist() == [2, 1]
    assert build_report(uri, by=["algo/epsilon_low"]).table["runs"].tolist() == [2, 1]  # a factor from the artifact


def test_sweep_parent_ends_even_without_a_finished_job(tmp_path, monkeypatch):
    cfg = compose_cfg(["logger.experiment_name=solo"], tmp_path, tmp_path / "cache")
    # both are set by what this test runs (MLFlowLogger exports its URI); the test leaves neither behind
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.logger.tracking_uri)
    monkeypatch.setenv(PARENT_ENV, "")
    single = make_logger(cfg, {"reward": "r1"}, [])
    assert "mlflow.parentRunId" not in single.experiment.get_run(single.run_id).data.tags  # not in a sweep
    single.end("FINISHED")

    callback = SweepRun()
    callback.on_multirun_start(cfg)
    parent = os.environ[PARENT_ENV]
    job = make_logger(cfg, {"reward": "r1"}, [])
    client = job.experiment
    assert client.get_run(job.run_id).data.tags["mlflow.parentRunId"] == parent
    job.end("FAILED")
    callback.on_multirun_end(cfg)
    callback.end()  # the atexit fallback after a normal end does nothing

    assert PARENT_ENV not in os.environ
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.tags["sweep"] == "true"
    assert "has no runs where" in run.data.tags["report_error"] and run.data.tags["jobs"] == "0/1 finished"
    assert [a.path for a in client.list_artifacts(parent)] == ["failed_jobs.md"]
    assert client.get_experiment_by_name("solo").tags[NOTE_TAG] == cfg.logger.description


@pytest.mark.slow
def test_a_multirun_is_one_parent_run_with_the_report(tmp_path, cache_dir):
    """The MedVR ablation grid `-m reward=accuracy,cca explore=none,evr`: four children of one parent, one table."""
    out = _sweep(tmp_path, cache_dir, "reward=accuracy,cca", "explore=none,evr")
    assert out.returncode == 0, out.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("medvr")
    assert experiment.tags[NOTE_TAG].startswith("medvr: GRPO ablations")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r is not parent]
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "4/4 finished"
    assert parent.info.run_name.startswith("sweep-") and parent.info.run_name.endswith("-reward,explore")
    assert "-m reward=accuracy,cca explore=none,evr" in parent.data.tags["command"]
    assert sorted((r.data.tags["reward"], r.data.tags["explore"]) for r in children) == [
        ("accuracy", "evr"), ("accuracy", "none"), ("cca", "evr"), ("cca", "none"),
    ]
    for r in children:
        assert ("train/cca/consensus_rate" in r.data.metrics) == (r.data.tags["reward"] == "cca")
        assert "train/explore/zooms_per_rollout" in r.data.metrics

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {f"report/{n}" for n in ("ablation.md", "ablation.csv", "final_val_acc.png", "curves_val_acc.png")}
    table = open(client.download_artifacts(parent.info.run_id, "report/ablation.md", str(tmp_path))).read()
    for reward in ("accuracy", "cca"):
        for explore in ("none", "evr"):
            assert f"| {reward} | {explore} | tiny | grpo_demo | 0 |" in table, table

    for child in children:
        params = child.data.params
        assert {"reward", "seed", "optimizer/lr", "algo/group_size", "trainer/max_steps"} <= set(params)
        assert "model/warm_start/steps" not in params and len(params) < 20
        assert params["trainer/max_steps"] == "1"
        config = yaml.safe_load(open(client.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path))))
        assert config["model"]["warm_start"]["steps"] == 100
