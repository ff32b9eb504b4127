"""Optuna search as a Hydra sweeper (hydra_plugins/medvr_optuna_sweeper): the search space, a resumable and
shared RDB study, FAIL and PRUNED trials, the pruning callback, and every trial an MLflow child run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
import yaml
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import TWO_STEPS, compose_cfg
from hydra_plugins.medvr_optuna_sweeper.search_space import as_overrides, parse
from medvr.tracking.pruning import OptunaPruning
from medvr.tracking.study import TRIAL_ENV, open_storage

ROOT = Path(__file__).resolve().parents[1]


def test_search_space_from_the_override_grammar():
    params = {"optimizer.lr": "tag(log, interval(1e-5, 1e-3))", "algo.group_size": "choice(4, 8)",
              "algo.beta": "interval(0.0, 0.1)", "trainer.max_steps": 100}
    space, keys, fixed = parse(params, ["algo.group_size=range(2, 10, 2)", "algo.beta=0.04", "+tag=choice(a,'b c')"])
    assert space == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "algo.group_size": IntDistribution(2, 8, step=2),  # the command line's sweep replaces the config's
        "tag": CategoricalDistribution(["a", "b c"]),
    }
    assert fixed == ["trainer.max_steps=100", "algo.beta=0.04"]  # a plain value pins a key of the space
    assert as_overrides({"optimizer.lr": 1e-4, "algo.group_size": 4, "tag": "b c"}, keys) == [
        "optimizer.lr=0.0001", "algo.group_size=4", "+tag=b\\ c",
    ]
    assert parse({"n": "tag(log, range(1, 65))"}, [])[0] == {"n": IntDistribution(1, 64, log=True)}
    with pytest.raises(ValueError, match="unknown tag"):
        parse({"x": "tag(cube, interval(0, 1))"}, [])


def test_grpo_optuna_composes_with_the_plugin_sweeper(tmp_path):
    cfg = compose_cfg(["hparams_search=grpo_optuna"], tmp_path, tmp_path / "cache")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.medvr_optuna_sweeper.sweeper.MedvrOptunaSweeper"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc"
    assert sweeper.storage == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    space, _, fixed = parse(dict(sweeper.params), [])
    assert space == {
        "optimizer.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "algo.group_size": CategoricalDistribution([4, 8]),
        "algo.beta": FloatDistribution(0.0, 0.1),
    }
    assert fixed == []
    callback = instantiate(cfg.callbacks.optuna_pruning)
    assert isinstance(callback.pruner, optuna.pruners.MedianPruner)
    assert (callback.monitor, callback.study_name, callback.storage) == ("val/acc", "grpo_optuna", sweeper.storage)


def _trainer(value: float, step: int):
    """The parts of a Lightning Trainer the pruning callback reads, after a validation during fit."""
    return SimpleNamespace(
        is_global_zero=True, logger=None, sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING),
        callback_metrics={"val/acc": torch.tensor(value)}, global_step=step,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
    )


def test_pruning_callback_reports_each_validation_and_prunes(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    trial = study.ask()
    callback = OptunaPruning("val/acc", "s", url, optuna.pruners.ThresholdPruner(lower=0.5))

    monkeypatch.delenv(TRIAL_ENV, raising=False)  # a single run: nothing reported
    callback.setup(_trainer(0.1, 1), None, "fit")
    callback.on_validation_end(_trainer(0.1, 1), None)
    assert callback.trial is None and study.trials[0].intermediate_values == {}

    monkeypatch.setenv(TRIAL_ENV, str(trial.number))
    callback.setup(_trainer(0.7, 1), None, "fit")
    callback.on_validation_end(_trainer(0.7, 1), None)  # above the threshold: goes on
    with pytest.raises(optuna.TrialPruned, match="trial 0 pruned at step 2: val/acc=0.2000"):
        callback.on_validation_end(_trainer(0.2, 2), None)
    assert study.trials[0].intermediate_values == pytest.approx({1: 0.7, 2: 0.2})


TOY_APP = '''
"""A toy task: objective (x - 0.3)^2; trials listed in fail / prune / nan misbehave on purpose."""
import math
import os

import hydra
import optuna


@hydra.main(version_base="1.3", config_path=".", config_name="toy")
def main(cfg) -> float:
    number = int(os.environ["MEDVR_OPTUNA_TRIAL"])
    if number in cfg.fail:
        raise ValueError(f"trial {number} fails on purpose")
    if number in cfg.prune:
        raise optuna.TrialPruned(f"trial {number} pruned on purpose")
    return math.nan if number in cfg.nan else (cfg.x - 0.3) ** 2


if __name__ == "__main__":
    main()
'''


def _toy(tmp_path: Path, *overrides: str, background: bool = False):
    """`python app.py -m` over the toy task with the medvr_optuna sweeper; the study in tmp_path/optuna.db."""
    (tmp_path / "app.py").write_text(TOY_APP)
    (tmp_path / "toy.yaml").write_text(textwrap.dedent(f"""\
        defaults:
          - override hydra/sweeper: medvr_optuna
          - _self_
        x: 0.0
        fail: []
        prune: []
        nan: []
        hydra:
          sweeper:
            study_name: toy
            storage: sqlite:///{tmp_path}/optuna.db
            direction: minimize
            n_trials: 4
            sampler: {{_target_: optuna.samplers.TPESampler, seed: 0}}
            params:
              x: interval(-1.0, 1.0)
        """))
    cmd = [sys.executable, "app.py", "-m", *overrides]
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # hydra_plugins and medvr from this checkout
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_sweeper_records_fail_prune_nan_and_resumes_the_study(tmp_path):
    out = _toy(tmp_path, "fail=[1]", "prune=[2]", "nan=[3]", f"hydra.sweep.dir={tmp_path}/first")
    assert out.returncode == 0, out.stderr[-3000:]
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/optuna.db")
    first = study.trials
    assert [t.state for t in first] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL]
    assert first[0].value == pytest.approx((first[0].params["x"] - 0.3) ** 2)
    assert first[1].user_attrs["fail_reason"] == "ValueError: trial 1 fails on purpose"
    assert first[3].user_attrs["fail_reason"].startswith("the job returned nan for the objective, not a finite number")
    results = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    assert results["best_trial"] == 0 and results["this_run"] == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 2}

    # the same command again: 4 more trials in the same study, numbered on, with fresh draws
    out = _toy(tmp_path, "fail=[1]", "prune=[2]", "nan=[3]", f"hydra.sweep.dir={tmp_path}/second")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials[4:])
    assert {t.params["x"] for t in trials[4:]}.isdisjoint(t.params["x"] for t in first)

    out = _toy(tmp_path, "fail=[8,9]", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/failing")
    assert out.returncode != 0 and "all 2 trials of this run failed" in out.stderr
    out = _toy(tmp_path, "hydra.sweeper.direction=maximize", f"hydra.sweep.dir={tmp_path}/other")
    assert out.returncode != 0 and "study 'toy' in sqlite:///" in out.stderr and "is set to minimize" in out.stderr


@pytest.mark.slow
def test_parallel_workers_share_one_study(tmp_path):
    workers = [_toy(tmp_path, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}/w{i}", background=True)
               for i in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/optuna.db").trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def _study(tmp_path, cache_dir, *params: str) -> subprocess.CompletedProcess:
    """`python train.py -m hparams_search=grpo_optuna <params>`: two quick steps per trial, validated after each."""
    steps = [o for o in TWO_STEPS if not o.startswith("trainer.val_check_interval")]
    cmd = [
        sys.executable, "train.py", "-m", "hparams_search=grpo_optuna", *params,
        f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *steps, "trainer.val_check_interval=1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env, check=False)


def _children(tmp_path):
    """(client, parents, children by trial number) of the medvr experiment in tmp_path's MLflow store."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    return client, parents, {int(r.data.tags["optuna_trial"]): r for r in runs if r not in parents}


# the 2-point space: lr and G pinned, beta in {0, 0.04}
TWO_POINTS = ["optimizer.lr=2e-4", "algo.group_size=4", "algo.beta=choice(0.0,0.04)"]


@pytest.mark.slow
def test_study_of_the_tiny_model_stores_mlflow_metrics_and_resumes(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    out = _study(tmp_path, cache_dir, *TWO_POINTS, "hydra.sweeper.n_trials=2")
    assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="grpo_optuna", storage=storage).trials
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(2)]
    _, (parent,), children = _children(tmp_path)
    assert sorted(children) == [0, 1]
    for trial in trials:
        run = children[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.value == pytest.approx(run.data.metrics["val/acc"], abs=1e-7)  # the last validation's
        assert float(run.data.params["algo/beta"]) == trial.params["algo.beta"]
        assert sorted(trial.intermediate_values) == [1, 2]  # reported by the pruning callback at each validation
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id

    out = _study(tmp_path, cache_dir, *TWO_POINTS, "hydra.sweeper.n_trials=1")  # the same study, one trial more
    assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="grpo_optuna", storage=storage).trials
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(3)]
    _, parents, children = _children(tmp_path)
    assert sorted(children) == list(range(3)) and len(parents) == 2
    second = {n for n, r in children.items() if r.data.tags["mlflow.parentRunId"] != parent.info.run_id}
    assert second == {2}
    assert sorted(p.data.tags["jobs"] for p in parents) == ["1/1 finished", "2/2 finished"]
    assert all(p.info.status == "FINISHED" for p in parents)


@pytest.mark.slow
def test_failed_and_pruned_trials_are_recorded_and_the_study_goes_on(tmp_path, cache_dir):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # another process queues the first two trials: an invalid loss type (fails its config check), then a valid one
    study = optuna.create_study(study_name="grpo_optuna", storage=open_storage(storage), direction="maximize")
    study.enqueue_trial({"algo.loss_type": "ppo"})
    study.enqueue_trial({"algo.loss_type": "grpo"})
    # a pruner that stops every trial at its first validation (val/acc is below 2)
    pruner = ["hydra.sweeper.pruner=null", "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:2.0}"]
    out = _study(tmp_path, cache_dir, "optimizer.lr=2e-4", "algo.group_size=4", "algo.beta=0.0",
                 "algo.loss_type=choice(ppo,grpo)", "hydra.sweeper.n_trials=2", *pruner)
    assert out.returncode == 0, out.stderr[-3000:]  # a pruned trial is an outcome, not a failure

    failed, pruned = optuna.load_study(study_name="grpo_optuna", storage=storage).trials
    assert (failed.state, failed.params) == (TrialState.FAIL, {"algo.loss_type": "ppo"})
    assert "algo.loss_type='ppo'" in failed.user_attrs["fail_reason"]
    assert (pruned.state, pruned.params) == (TrialState.PRUNED, {"algo.loss_type": "grpo"})
    assert list(pruned.intermediate_values) == [1] and pruned.value == pruned.intermediate_values[1]

    client, (parent,), children = _children(tmp_path)
    assert children[0].info.status == "FAILED" and "loss_type" in children[0].data.tags["error"]
    run = children[1]
    assert run.info.status == "KILLED"  # not FAILED: nothing went wrong; not FINISHED: it did not train to its budget
    assert run.data.tags["optuna_state"] == "PRUNED" and run.data.tags["killed_by"] == "optuna pruner"
    assert run.data.tags["killed_at_step"] == "1"
    assert math.isclose(run.data.metrics["val/acc"], pruned.value, abs_tol=1e-7)
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "0/2 finished"
    failed_jobs = Path(client.download_artifacts(parent.info.run_id, "failed_jobs.md", str(tmp_path))).read_text()
    assert "KILLED: optuna pruner" in failed_jobs and "FAILED: " in failed_jobs
