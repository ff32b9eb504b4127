"""eval.py: a checkpoint evaluated without training, over several sets, into one MLflow run."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import mlflow
import pytest
from omegaconf import open_dict

from conftest import FAST_MODEL, SMALL_DATA, TWO_STEPS, compose_cfg
from medvr.evaluate import EvalInputError
from medvr.evaluate import run as evaluate
from medvr.train import run as train
from test_data_vqa_rad_pathvqa import _write_hub


def _eval_cfg(tmp_path, cache_dir, *overrides):
    cfg = compose_cfg([*FAST_MODEL, *SMALL_DATA, "data.eval_batch_size=4", *overrides], tmp_path, cache_dir, "eval")
    with open_dict(cfg):
        cfg.logger.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    return cfg


def _only_run(cfg, experiment: str):
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, found


def _artifact_csv(client, run_id: str, path: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(Path(client.download_artifacts(run_id, path)).read_text())))


@pytest.mark.slow
def test_two_sets_give_one_run_with_metrics_table_and_predictions(tmp_path, cache_dir):
    rad = _write_hub(tmp_path / "vqa_rad", {"train": 6, "test": 7})
    cfg = _eval_cfg(tmp_path, cache_dir, "sets=[vqa_rad]", f"sets.vqa_rad.path={rad}", "sets.vqa_rad.source.val_size=2")
    results = evaluate(cfg)
    client, found = _only_run(cfg, "medvr-eval")
    assert found.info.status == "FINISHED" and found.data.tags["sets"] == "synthetic,vqa_rad"
    for name, n in (("synthetic", 8), ("vqa_rad", 7)):
        rows = _artifact_csv(client, found.info.run_id, f"predictions/{name}.csv")
        assert len(rows) == n
        # the logged accuracy is the share of correct predictions, per set and per modality
        assert found.data.metrics[f"eval/{name}/acc"] == pytest.approx(sum(int(r["correct"]) for r in rows) / n)
        for modality in {r["modality"] for r in rows}:
            mine = [r for r in rows if r["modality"] == modality]
            assert found.data.metrics[f"eval/{name}/acc/{modality}"] == pytest.approx(
                sum(int(r["correct"]) for r in mine) / len(mine))
        assert found.data.tags[f"distribution/{name}"] == "unknown"  # the tiny model's training data is not on record
    # VQA-RAD's open questions get token F1/recall, its closed and open questions their own accuracies
    assert {"eval/vqa_rad/f1", "eval/vqa_rad/recall", "eval/vqa_rad/acc/answer_type/closed",
            "eval/vqa_rad/acc/answer_type/open"} <= set(found.data.metrics)
    assert "eval/synthetic/f1" not in found.data.metrics  # choice questions only
    table = _artifact_csv(client, found.info.run_id, "eval_table.csv")
    assert [(r["set"], r["modality"]) for r in table if r["modality"] == "all"] == [("synthetic", "all"), ("vqa_rad", "all")]
    assert "| vqa_rad | test | all | 7 |" in Path(client.download_artifacts(found.info.run_id, "eval_table.md")).read_text()
    assert results["eval/vqa_rad/n"] == 7


@pytest.mark.slow
def test_a_trained_run_is_evaluated_from_its_export_and_scores_as_its_own_test(tmp_path, cache_dir):
    train_cfg = compose_cfg([*TWO_STEPS, "test_after_training=true", "data.eval_batch_size=4", "callbacks.export_hf.merge_lora=false"],
                            tmp_path, cache_dir)
    with open_dict(train_cfg):
        train_cfg.logger.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    trained = train(train_cfg)
    _, run = _only_run(train_cfg, "medvr")
    cfg = _eval_cfg(tmp_path, cache_dir, f"run={run.info.run_id}", "explore.max_new_tokens=40")
    results = evaluate(cfg)
    _, found = _only_run(cfg, "medvr-eval")
    assert found.data.tags["evaluated_run"] == run.info.run_id
    # the exported policy, reloaded, answers the test split exactly as the trained one did in memory
    assert results["eval/synthetic/acc"] == pytest.approx(trained["test/acc"])
    assert found.data.tags["distribution/synthetic"] == "in"  # trained on synthetic data


def test_bad_run_and_split_fail_before_any_model_loads(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr("medvr.models.spec.ModelSpec.load", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(EvalInputError, match="neither a directory nor a run id"):
        evaluate(_eval_cfg(tmp_path, cache_dir, "run=no-such-run"))
    with pytest.raises(EvalInputError, match="has no split 'train'"):
        evaluate(_eval_cfg(tmp_path, cache_dir, "split=train", "model.cache_dir=/nonexistent/never-built"))
    with pytest.raises(FileNotFoundError, match="VQA-RAD: .* holds neither layout"):
        evaluate(_eval_cfg(tmp_path, cache_dir, "sets=[vqa_rad]", f"sets.vqa_rad.path={tmp_path}/missing"))
