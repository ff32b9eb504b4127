"""Runs you can trust: exact resume, honest MLflow status, signals, a safe concurrent store, non-finite guards."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import TWO_STEPS, compose_cfg
from medvr.rollout.generate import NonFiniteError
from medvr.tracking.run import run_name, swept_overrides
from medvr.train import run

ROOT = Path(__file__).resolve().parents[1]
# four steps with a full-state checkpoint every two, evaluation at steps 2 and 4
FOUR_STEPS = [
    *[o for o in TWO_STEPS if not o.startswith("trainer.max_steps")],
    "trainer.max_steps=4",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "callbacks.rollout_samples=null",
    "callbacks.reward_curve=null",
]


def _runs(uri: str):
    client = mlflow.MlflowClient(uri)
    return client, client.search_runs([client.get_experiment_by_name("medvr").experiment_id])


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, cache_dir):
    whole = compose_cfg(FOUR_STEPS, tmp_path / "whole", cache_dir)
    run(whole)
    client, (reference,) = _runs(whole.logger.tracking_uri)
    expected = _history(client, reference.info.run_id, "train/loss")
    assert sorted(expected) == [1, 2, 3, 4]

    first = compose_cfg([*FOUR_STEPS, "trainer.max_steps=2"], tmp_path / "parts", cache_dir)
    run(first)
    last = Path(first.paths.run_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    again = compose_cfg([*FOUR_STEPS, f"ckpt_path={last}"], tmp_path / "parts", cache_dir)
    again.paths.run_dir = str(tmp_path / "parts" / "elsewhere")  # a new Hydra job dir: resuming writes to the old one
    run(again)

    client, runs = _runs(first.logger.tracking_uri)
    assert len(runs) == 1, "resuming continues the same MLflow run"
    (resumed,) = runs
    assert resumed.info.status == "FINISHED"
    got = _history(client, resumed.info.run_id, "train/loss")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    final = _weights(last)
    reference_final = _weights(Path(whole.paths.run_dir) / "checkpoints" / "last.ckpt")
    assert final.keys() == reference_final.keys()
    for key, value in reference_final.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=0)
    assert not any(k.startswith("_frozen_ref") for k in final)  # the reference copy is never checkpointed
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4 and checkpoint["optimizer_states"]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, cache_dir):
    first = compose_cfg([*FOUR_STEPS, "trainer.max_steps=2"], tmp_path, cache_dir)
    run(first)
    last = Path(first.paths.run_dir) / "checkpoints" / "last.ckpt"
    other = compose_cfg([*FOUR_STEPS, "optimizer.lr=1e-3", f"ckpt_path={last}"], tmp_path, cache_dir)
    with pytest.raises(ValueError, match=r"optimizer.lr: 0.0003 -> 0.001"):
        run(other)
    same = compose_cfg([*FOUR_STEPS, "ckpt_path=last"], tmp_path, cache_dir)
    from medvr.resume import locate

    assert locate(same).path == last  # `last` finds the newest last.ckpt of the same config
    missing = compose_cfg([*FOUR_STEPS, f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path, cache_dir)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        run(missing)
    client, runs = _runs(first.logger.tracking_uri)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]  # no run left RUNNING


def test_run_is_running_until_fit_and_test_end(tmp_path, cache_dir, monkeypatch):
    """Lightning finalises loggers after `validate`; the run must stay RUNNING until the job ends."""
    cfg = compose_cfg([*TWO_STEPS, "validate_before_training=true", "trainer.max_steps=1"], tmp_path, cache_dir)
    seen = []
    from medvr.module import GRPOModule

    original = GRPOModule.training_step

    def spy(self, batch, batch_idx):
        client = mlflow.MlflowClient(cfg.logger.tracking_uri)
        seen.append(client.get_run(self.logger.run_id).info.status)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GRPOModule, "training_step", spy)
    run(cfg)
    assert seen == ["RUNNING"]
    _, (found,) = _runs(cfg.logger.tracking_uri)
    assert found.info.status == "FINISHED"


def test_failure_while_logging_the_config_marks_the_run_failed(tmp_path, cache_dir):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = compose_cfg([*TWO_STEPS, f"logger.artifact_location={blocker}/artifacts"], tmp_path, cache_dir)
    with pytest.raises(Exception):
        run(cfg)
    _, (found,) = _runs(cfg.logger.tracking_uri)
    assert found.info.status == "FAILED" and found.data.tags["error"]


def test_divergence_is_caught_with_the_step_and_the_likely_key(tmp_path, cache_dir):
    cfg = compose_cfg([*FOUR_STEPS, "optimizer.lr=1e10", "trainer.max_steps=6"], tmp_path, cache_dir)
    with pytest.raises(NonFiniteError, match=r"training stopped at step \d.*optimizer.lr=1e\+10"):
        run(cfg)
    _, (found,) = _runs(cfg.logger.tracking_uri)
    assert found.info.status == "FAILED" and "optimizer.lr" in found.data.tags["error"]


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(tmp_path, cache_dir, monkeypatch):
    import medvr.module

    real = medvr.module.policy_loss

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), parts

    monkeypatch.setattr(medvr.module, "policy_loss", poisoned)
    cfg = compose_cfg([*FOUR_STEPS, "algo.max_nonfinite_steps=2", "trainer.max_steps=6"], tmp_path, cache_dir)
    with pytest.raises(NonFiniteError, match="2 updates in a row") as caught:
        run(cfg)
    assert "step 1" in str(caught.value)  # no update was applied: the step counter never moved
    client, (found,) = _runs(cfg.logger.tracking_uri)
    assert found.info.status == "FAILED"
    skipped = [m.value for m in client.get_metric_history(found.info.run_id, "train/nonfinite_steps")]
    assert skipped == [1.0, 2.0][: len(skipped)] and skipped


def test_multirun_names_show_the_swept_overrides(tmp_path):
    argv = ["-m", "reward=accuracy,r1", "optimizer.lr=1e-3,2e-3", "seed=0,1", "trainer.max_steps=5"]
    assert swept_overrides(argv, None) == ["reward", "optimizer.lr", "seed"]
    assert swept_overrides(["explore=evr"], {"algo.beta": "0,0.04"}) == ["algo.beta"]
    cfg = compose_cfg(["optimizer.lr=2e-3", "seed=1"], tmp_path, tmp_path / "cache")
    choices = {"reward": "r1", "explore": "none", "model": "tiny", "algo": "grpo"}
    assert run_name(cfg, choices, ["reward", "optimizer.lr", "seed"]) == "r1-none-tiny-grpo-optimizer.lr=0.002-s1"


def _open_run(uri: str, artifacts: str, barrier, index: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import compose_cfg as compose

    cfg = compose([f"logger.tracking_uri={uri}", f"logger.artifact_location={artifacts}"], Path(artifacts), Path(artifacts))
    from medvr.tracking.run import make_logger

    barrier.wait()  # every process reaches the fresh store at the same moment
    logger = make_logger(cfg, {"reward": "r1"}, [])
    logger.log_metrics({"train/reward": float(index)}, step=1)
    logger.end("FINISHED")


@pytest.mark.slow
def test_two_processes_starting_on_a_fresh_store_both_log(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_open_run, args=(uri, str(tmp_path), barrier, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    client, runs = _runs(uri)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.metrics["train/reward"] for r in runs) == [0.0, 1.0]


def _launch(tmp_path: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "train.py", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
        *[o for o in FOUR_STEPS if not o.startswith("trainer.max_steps")], "trainer.max_steps=200",
        "callbacks.last_checkpoint.every_n_train_steps=100", *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_first_step(uri: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            client, runs = _runs(uri)
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                return
        except Exception:  # the store or the experiment does not exist yet
            pass
        time.sleep(0.5)
    raise TimeoutError("no training step was logged")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_marks_the_run_killed(tmp_path, cache_dir, signum, code):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = _launch(tmp_path, cache_dir)
    _wait_for_first_step(uri, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out
    _, (found,) = _runs(uri)
    assert found.info.status == "KILLED"
    assert found.data.tags["killed_by"] == signal.Signals(signum).name
    step = int(found.data.tags["killed_at_step"])
    assert step >= 1
    checkpoint = Path(found.data.tags["resume_from"])
    assert checkpoint.name == "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == step
