"""`medvr.report` on hand-made MLflow runs: arms never pool different configs, seeds are averaged, paired CIs."""

from __future__ import annotations

import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from PIL import Image

from medvr.report import ReportError, bootstrap_ci, build_report, main

BASE = "r1 | none | tiny | grpo | optimizer/lr=0.0002"
ACC = "accuracy | none | tiny | grpo | optimizer/lr=0.0002"
EVR_LOW = "r1 | evr | tiny | grpo | optimizer/lr=0.0002"
EVR_HIGH = "r1 | evr | tiny | grpo | optimizer/lr=0.0003"
CCA = "cca | evr | tiny | grpo | optimizer/lr=0.0002"


def add_run(client, experiment_id, root, *, reward, explore="none", seed, acc, lr="0.0002", curve=(0.3, 0.4, 0.5),
            status="FINISHED", tags=None, params=None) -> str:
    """One run as medvr logs it: option tags, flattened params (run-dir ones unique per run), test/val metrics."""
    run = client.create_run(experiment_id, tags={"reward": reward, "explore": explore, "model": "tiny", "algo": "grpo",
                                                  "data": "synthetic", "seed": str(seed), **(tags or {})})
    run_dir = f"{root}/multiruns/{run.info.run_id}"
    logged = {
        "seed": str(seed), "data/seed": str(seed), "data/source/seed": "0", "model/seed": "0",
        "optimizer/lr": lr, "algo/group_size": "4", "trainer/max_steps": "200",
        "reward/_target_": f"medvr.rewards.{reward}", "explore/_target_": f"medvr.explore.{explore}",
        "callbacks/model_checkpoint/dirpath": f"{run_dir}/checkpoints", "trainer/default_root_dir": run_dir,
        "logger/run_name": f"{reward}-{explore}-s{seed}", "model/cache_dir": f"{root}/cache",
        **(params or {}),
    }
    now = int(time.time() * 1000)
    metrics = [Metric("test/acc", acc, now, 0), Metric("test/acc/MRI", acc / 2, now, 0)]
    metrics += [Metric("val/acc", v, now, step) for step, v in zip((0, 50, 100), curve)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in logged.items()])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The `medvr` experiment: a 3-seed baseline, a paired arm, an arm mixing two learning rates, an unpaired arm."""
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/m.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("medvr", artifact_location=str(root / "artifacts"))
    for seed, acc in zip((0, 1, 2), (0.50, 0.60, 0.55)):
        add_run(client, exp, root, reward="r1", seed=seed, acc=acc, curve=(0.3, 0.4 + seed / 10, 0.5))
    for seed, acc in zip((0, 1, 2), (0.60, 0.65, 0.70)):
        add_run(client, exp, root, reward="accuracy", seed=seed, acc=acc)
    for seed, acc in zip((0, 1), (0.70, 0.80)):
        add_run(client, exp, root, reward="r1", explore="evr", seed=seed, acc=acc)
    for seed, acc in zip((0, 1), (0.40, 0.50)):
        add_run(client, exp, root, reward="r1", explore="evr", seed=seed, acc=acc, lr="0.0003")
    add_run(client, exp, root, reward="cca", explore="evr", seed=5, acc=0.9)
    add_run(client, exp, root, reward="r1", seed=3, acc=0.99, status="FAILED")  # never reported
    return root, uri, client


def test_arms_split_on_any_config_difference_and_average_only_seeds(store):
    _, uri, _ = store
    table = build_report(uri).table
    assert list(table.index) == sorted([ACC, CCA, BASE, EVR_LOW, EVR_HIGH])
    assert table.loc[BASE, "runs"] == 3 and table.loc[BASE, "seeds"] == "0,1,2"  # the FAILED seed 3 is left out
    assert table.loc[BASE, "test/acc"] == pytest.approx(0.55)
    assert table.loc[BASE, "test/acc std"] == pytest.approx(0.05)
    assert table.loc[BASE, "test/acc n"] == 3
    assert table.loc[BASE, "test/acc/MRI"] == pytest.approx(0.275)
    assert table.loc[EVR_LOW, ["test/acc", "test/acc n"]].tolist() == pytest.approx([0.75, 2])
    assert table.loc[EVR_HIGH, "test/acc"] == pytest.approx(0.45)
    assert table.loc[EVR_HIGH, "test/acc std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert np.isnan(table.loc[CCA, "test/acc std"]) and table.loc[CCA, "test/acc n"] == 1
    # reward/_target_ follows the reward factor, model/seed and data/source/seed never differ: not shown
    assert table.loc[BASE, "config"] == "optimizer/lr=0.0002"


def test_refuse_names_the_group_and_the_differing_values(store):
    _, uri, _ = store
    with pytest.raises(ReportError) as err:
        build_report(uri, on_mismatch="refuse")
    message = str(err.value)
    assert "reward=r1, explore=evr" in message and "optimizer/lr: 0.0002, 0.0003" in message
    assert "explore=none" not in message  # the consistent groups are not blamed
    # the same runs pass once the learning rate is a factor
    table = build_report(uri, by=["reward", "explore", "optimizer/lr"], on_mismatch="refuse").table
    assert table.loc["r1 | evr | 0.0003", "test/acc"] == pytest.approx(0.45)


def test_an_option_group_outside_by_shows_as_its_tag(store):
    _, uri, _ = store
    table = build_report(uri, by=["reward"]).table
    assert "r1 | explore=evr | optimizer/lr=0.0003" in table.index  # not every explore/... key
    assert table.loc["r1 | explore=none | optimizer/lr=0.0002", "runs"] == 3


def test_ignore_extends_the_run_location_list(store):
    _, uri, _ = store
    table = build_report(uri, by=["reward", "explore"], ignore=("optimizer/lr",)).table
    assert table.loc["r1 | evr", "runs"] == 4 and table.loc["r1 | evr", "seeds"] == "0,0,1,1"


def test_model_seed_is_a_config_difference_not_a_run_seed(store, tmp_path):
    _, uri, client = store
    exp = client.create_experiment("model_seed", artifact_location=str(tmp_path))
    add_run(client, exp, tmp_path, reward="r1", seed=0, acc=0.5, params={"model/seed": "0"})
    add_run(client, exp, tmp_path, reward="r1", seed=1, acc=0.6, params={"model/seed": "1"})
    table = build_report(uri, "model_seed").table
    assert list(table.index) == ["r1 | none | tiny | grpo | model/seed=0", "r1 | none | tiny | grpo | model/seed=1"]


def test_paired_difference_against_the_baseline(store):
    _, uri, _ = store
    table = build_report(uri, baseline="reward=r1,explore=none,optimizer/lr=0.0002").table
    # accuracy - r1 per seed: 0.10, 0.05, 0.15
    diff, low, high, pairs = table.loc[ACC, ["test/acc diff", "test/acc ci_low", "test/acc ci_high", "test/acc pairs"]]
    assert diff == pytest.approx(0.10) and pairs == 3
    assert low <= diff <= high and low >= 0.05 - 1e-9 and high <= 0.15 + 1e-9
    assert (low, high) == pytest.approx(bootstrap_ci([0.10, 0.05, 0.15]))
    assert table.loc[EVR_HIGH, "test/acc diff"] == pytest.approx(np.mean([0.40 - 0.50, 0.50 - 0.60]))
    assert table.loc[EVR_HIGH, "test/acc pairs"] == 2
    # cca ran seed 5 only: no pair, no difference
    assert table.loc[CCA, "test/acc pairs"] == 0 and np.isnan(table.loc[CCA, "test/acc diff"])
    assert table.loc[BASE, "test/acc pairs"] == 0


def test_identical_differences_give_a_zero_width_interval(store, tmp_path):
    _, uri, client = store
    exp = client.create_experiment("identical_differences", artifact_location=str(tmp_path))
    for seed, acc in zip((0, 1, 2), (0.25, 0.5, 0.75)):
        add_run(client, exp, tmp_path, reward="r1", seed=seed, acc=acc)
        add_run(client, exp, tmp_path, reward="cca", seed=seed, acc=acc + 0.125)
    report = build_report(uri, "identical_differences", by=["reward"], baseline={"reward": "r1"})
    row = report.table.loc["cca"]
    assert (row["test/acc diff"], row["test/acc ci_low"], row["test/acc ci_high"]) == (0.125, 0.125, 0.125)
    assert report.formatted().loc["cca", "Δ test/acc"] == "+0.125 [+0.125, +0.125] (3 pairs)"
    assert report.formatted().loc["r1", "Δ test/acc"] == "baseline"


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
    d = np.array([0.1, -0.2, 0.3, 0.05])
    picks = np.random.default_rng(0).integers(0, 4, size=(10_000, 4))
    assert bootstrap_ci(d) == pytest.approx(tuple(np.percentile(d[picks].mean(axis=1), [2.5, 97.5])))


def test_markdown_csv_and_plots(store, tmp_path):
    _, uri, _ = store
    report = build_report(uri, baseline="reward=r1,explore=none")
    markdown = report.to_markdown().splitlines()
    assert len(markdown) == 2 + 5 and markdown[0].startswith("| reward | explore | model | algo | config | seeds |")
    assert "unpaired (no shared seed)" in markdown[2 + list(report.table.index).index(CCA)]

    report.to_csv(tmp_path / "t.csv")
    back = pd.read_csv(tmp_path / "t.csv", index_col="arm", dtype={"seeds": str})
    pd.testing.assert_frame_equal(back, report.table, check_dtype=False)

    report.plot_final(tmp_path / "final.png")
    report.plot_curves(tmp_path / "curves.png", "val/acc")
    for name in ("final.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 100
    with pytest.raises(ReportError, match="no run has a history of 'val/loss'"):
        report.plot_curves(tmp_path / "x.png", "val/loss")


def test_cli_writes_every_output(store, tmp_path, capsys):
    _, uri, _ = store
    main(["--tracking-uri", uri, "--by", "reward", "explore", "--metrics", "test/acc", "--baseline", "reward=accuracy",
          "--markdown-out", str(tmp_path / "t.md"), "--csv-out", str(tmp_path / "t.csv"),
          "--plots-dir", str(tmp_path / "p")])
    printed = capsys.readouterr().out
    assert "Δ test/acc" in printed and "accuracy" in printed
    assert (tmp_path / "t.md").read_text().count("\n") == 2 + 5
    assert len(pd.read_csv(tmp_path / "t.csv")) == 5
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["curves_val_acc.png", "final_test_acc.png"]


def test_parent_run_and_filter_select_runs(store, tmp_path):
    _, uri, client = store
    exp = client.create_experiment("sweep", artifact_location=str(tmp_path))
    parent = client.create_run(exp).info.run_id
    add_run(client, exp, tmp_path, reward="r1", seed=0, acc=0.5, tags={"mlflow.parentRunId": parent})
    add_run(client, exp, tmp_path, reward="cca", seed=0, acc=0.7, params={"trainer/max_steps": "2"})
    assert list(build_report(uri, "sweep", by=["reward"], parent_run_id=parent).table.index) == ["r1"]
    only_short = build_report(uri, "sweep", by=["reward"], filter_string="params.`trainer/max_steps` = '2'")
    assert list(only_short.table.index) == ["cca"]
    # unfiltered, the 2-step run is never pooled silently: max_steps shows in every row
    configs = build_report(uri, "sweep", by=["reward"]).table["config"]
    assert sorted(configs) == ["trainer/max_steps=2", "trainer/max_steps=200"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"experiment": "nope"}, "no MLflow experiment named 'nope'.*'medvr'"),
        ({"by": ["reward", "temperature"]}, r"unknown factor\(s\) \['temperature'\]: tags are .*'explore'"),
        ({"metrics": ["test/f1"]}, r"no run has a metric matching 'test/f1'; metrics are \['test/acc'"),
        ({"baseline": "reward=r1"}, "matches 3 arms"),
        ({"baseline": "temperature=1"}, "baseline key"),
        ({"filter_string": "params.seed = '99'"}, "has no runs where"),
    ],
)
def test_clear_errors(store, kwargs, message):
    _, uri, _ = store
    with pytest.raises(ReportError, match=message):
        build_report(uri, **kwargs)


def test_missing_store_is_not_created(tmp_path):
    with pytest.raises(ReportError, match="no MLflow store"):
        build_report(f"sqlite:///{tmp_path}/absent.db")
    assert not (tmp_path / "absent.db").exists()
