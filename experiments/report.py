"""Ablation table from MLflow: finished runs grouped by their option tags, mean +/- std over seeds.

    python experiments/report.py [--experiment medvr] [--by reward explore] [--metrics val/acc ...]
        [--tracking-uri sqlite:///outputs/mlflow.db] [--markdown]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow
import pandas as pd

DEFAULT_URI = f"sqlite:///{Path('outputs').resolve()}/mlflow.db"


def ablation_table(
    tracking_uri: str, experiment: str, by: list[str], metrics: list[str] | None = None
) -> pd.DataFrame:
    """One row per combination of `by` tags; columns `<metric>` (mean) and `<metric> std`, plus `runs`."""
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000)
    rows = [{**{t: r.data.tags.get(t, "-") for t in by}, **r.data.metrics} for r in runs]
    if not rows:
        raise SystemExit(f"experiment {experiment!r} has no finished runs")
    frame = pd.DataFrame(rows)
    if metrics is None:  # the final evaluation: test accuracy overall and per modality
        prefix = "test/acc" if "test/acc" in frame.columns else "val/acc"
        metrics = sorted(c for c in frame.columns if c.startswith(prefix))
    grouped = frame.groupby(by)[metrics]
    table = grouped.mean().join(grouped.std().add_suffix(" std")).join(grouped.size().rename("runs"))
    return table[[c for m in metrics for c in (m, f"{m} std")] + ["runs"]]


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """`mean ± std` cells (std omitted for single runs)."""
    metrics = [c for c in table.columns if c != "runs" and not c.endswith(" std")]
    cells = {
        m: [f"{mu:.3f}" + ("" if pd.isna(sd) else f" ± {sd:.3f}") for mu, sd in zip(table[m], table[f"{m} std"])]
        for m in metrics
    }
    return pd.DataFrame({**cells, "runs": table["runs"].tolist()}, index=table.index)


def to_markdown(table: pd.DataFrame) -> str:
    frame = table.reset_index()
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    parser.add_argument("--experiment", default="medvr")
    parser.add_argument("--by", nargs="+", default=["reward", "explore", "model"])
    parser.add_argument("--metrics", nargs="+", default=None)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    table = ablation_table(args.tracking_uri, args.experiment, args.by, args.metrics)
    table = formatted(table)
    print(to_markdown(table) if args.markdown else table.to_string())


if __name__ == "__main__":
    main()
