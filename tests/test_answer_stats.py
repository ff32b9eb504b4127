"""Collapse is visible: answer-letter spread (train and eval), accuracy per question type, a warning."""

from __future__ import annotations

import logging
import math
from collections import Counter

import mlflow
import pytest

from conftest import TWO_STEPS, compose_cfg
from medvr.answer_stats import answer_counts, letter_stats, top_answer
from medvr.data import synthetic
from medvr.train import run


def test_letter_stats_of_a_collapsed_and_a_spread_policy():
    collapsed = letter_stats(answer_counts(["A"] * 9 + [None]), Counter({"A": 3, "B": 7}))
    assert collapsed["top_share"] == 0.9 and collapsed["top_key_share"] == 0.3
    assert collapsed["entropy"] == pytest.approx(-(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1)))
    spread = letter_stats(answer_counts(list("ABCD") * 5))
    assert spread == {"entropy": pytest.approx(2.0), "top_share": 0.25}
    assert top_answer(answer_counts(["B", "A", "B", "A"])) == ("A", 2)  # ties: alphabetically first
    assert top_answer(answer_counts([None, None, "C"])) == ("-", 2)  # no letter is an answer of its own
    assert letter_stats(Counter()) == {}


def test_eval_logs_accuracy_per_type_and_the_answer_spread_and_warns_on_collapse(tmp_path, cache_dir, caplog):
    overrides = [*TWO_STEPS, "trainer.max_steps=1", "validate_before_training=true", "collapse_share=0.01"]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    with caplog.at_level(logging.WARNING, logger="medvr.module"):
        run(cfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    metrics = found.data.metrics
    val = synthetic.generate(cfg.data.source.n_val, cfg.data.source.seed, "val")
    types = Counter(item.record["question_type"] for item in val)
    assert {f"val/acc/type/{t}" for t in types} <= set(metrics)
    weighted = sum(metrics[f"val/acc/type/{t}"] * n for t, n in types.items()) / sum(types.values())
    assert weighted == pytest.approx(metrics["val/acc"])  # the per-type accuracies add up to the total
    keys = Counter(item.record["answer"] for item in val)
    assert metrics["val/answer/top_key_share"] in {n / len(val) for n in keys.values()} | {0.0}
    assert 0.0 <= metrics["val/answer/entropy"] <= math.log2(6)
    assert {"train/answer/entropy", "train/answer/top_share"} <= set(metrics)
    assert any("collapsed onto one letter" in r.getMessage() for r in caplog.records)


def test_a_run_tests_its_start_and_end_and_prints_both(tmp_path, cache_dir, capsys):
    overrides = [*TWO_STEPS, "validate_before_training=true", "test_before_training=true", "test_after_training=true"]
    cfg = compose_cfg(overrides, tmp_path, cache_dir)
    run(cfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    history = sorted(client.get_metric_history(found.info.run_id, "test/acc"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 2]  # the starting policy, then the trained one
    assert found.data.metrics["test/acc"] == history[-1].value  # the run's test/acc is the trained policy's
    val = sorted(client.get_metric_history(found.info.run_id, "val/acc"), key=lambda m: m.step)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.split()[:1] == ["acc"])
    assert line.split() == ["acc", f"{val[0].value:.3f}", "->", f"{val[-1].value:.3f}", "|",
                            f"{history[0].value:.3f}", "->", f"{history[-1].value:.3f}"]


def test_sampled_evaluation_scores_k_answers_per_row_and_leaves_training_as_it_was(tmp_path, cache_dir):
    """eval_samples=k logs val/acc_sampled (avg@k, per type too) without changing what training samples."""
    overrides = [*TWO_STEPS, "trainer.max_steps=1", "validate_before_training=true"]
    found = {}
    for k in (0, 3):
        cfg = compose_cfg([*overrides, f"eval_samples={k}"], tmp_path / str(k), cache_dir)
        run(cfg)
        client = mlflow.MlflowClient(cfg.logger.tracking_uri)
        (found[k],) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    sampled, greedy = found[3].data.metrics, found[0].data.metrics
    assert "val/acc_sampled" not in greedy
    n_val = cfg.data.source.n_val
    assert sampled["val/acc_sampled"] * 3 * n_val == pytest.approx(round(sampled["val/acc_sampled"] * 3 * n_val))
    val = synthetic.generate(n_val, cfg.data.source.seed, "val")
    types = Counter(item.record["question_type"] for item in val)
    weighted = sum(sampled[f"val/acc_sampled/type/{t}"] * n for t, n in types.items()) / n_val
    assert weighted == pytest.approx(sampled["val/acc_sampled"])  # the per-type rows add up to the total
    assert sampled["val/acc"] == greedy["val/acc"]  # the greedy answers are the same ones
    # sampling at evaluation draws from a seed of its own: the training step samples the same rollouts
    for key in ("train/reward", "train/loss", "train/completion_length"):
        assert sampled[key] == greedy[key], key
