"""Ablation report: finished MLflow runs, one row per arm, mean ± std over seeds and paired differences.

    python -m medvr.report [--experiment medvr] [--by reward explore model algo] [--metrics test/acc ...]
        [--baseline reward=r1,explore=none] [--on-mismatch split|refuse] [--ignore PATTERN ...]
        [--filter "params.`trainer/max_steps` = '200'"] [--parent-run-id ID] [--tracking-uri URI]
        [--markdown | --markdown-out PATH] [--csv-out PATH] [--plots-dir DIR [--curve-metric val/acc]]

A comparison that cannot lie: seeds (`seed`, `data/seed`) are the only thing averaged over. A run's
config is its whole resolved config, flattened (`optimizer/lr`): the `config_flat.json` artifact medvr
logs next to its short list of params (a run without that artifact: its params); runs that differ in
any other key are never pooled: `split` makes the differing keys part of the arm (the row
shows `key=value`), `refuse` stops and names them. IGNORE lists the config keys that say where a run is,
not what it is. The difference to a baseline arm pairs runs by seed (same seed: same data order and
initial noise) and bootstraps a 95% CI from the per-seed differences (none below 2 pairs); with 3-5
seeds that interval is optimistic, so read it together with the number of pairs.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DEFAULT_URI = f"sqlite:///{Path('outputs').resolve()}/mlflow.db"
# option tags written by medvr.tracking.run; a factor may also be a param key such as optimizer/lr
DEFAULT_BY = ("reward", "explore", "model", "algo")
# the run seed and the data-order seed that interpolates it (model/seed builds the tiny model: config)
SEED_KEYS = ("seed", "data/seed")
# config keys (fnmatch patterns) that locate a run rather than describe it; extend with --ignore
IGNORE = (
    "callbacks/*/dirpath",  # checkpoints inside the run directory
    "trainer/default_root_dir",  # the run directory
    "logger/*",  # tracking store, artifact location, run name
    "model/cache_dir",
    "data/source/cache_dir",
    "data/verdict_cache",
)
# the flattened resolved config of a run, written by medvr.tracking.run.log_config
CONFIG_ARTIFACT = "config_flat.json"
ABSENT = "<absent>"
RESAMPLES = 10_000


class ReportError(ValueError):
    """Input the report cannot honestly summarise: what was wrong and what exists instead."""


def bootstrap_ci(differences, resamples: int = RESAMPLES) -> tuple[float, float]:
    """Percentile 95% interval of the mean of paired differences, resampled with replacement (rng seed 0)."""
    d = np.asarray(differences, dtype=float)  # [pairs]
    picks = np.random.default_rng(0).integers(0, len(d), size=(resamples, len(d)))  # [resamples, pairs]
    low, high = np.percentile(d[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def finished_runs(
    tracking_uri: str, experiment: str, filter_string: str | None = None, parent_run_id: str | None = None
) -> tuple[mlflow.MlflowClient, list]:
    """The client and the FINISHED runs of `experiment` (sweep parents left out), optionally filtered or one sweep's."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        raise ReportError(f"no MLflow store at {tracking_uri}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"no MLflow experiment named {experiment!r} at {tracking_uri}; it has {names}")
    parent = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else None
    query = " and ".join(c for c in ("attributes.status = 'FINISHED'", parent, filter_string) if c)
    runs = client.search_runs([found.experiment_id], query, max_results=50_000)
    if runs.token:
        raise ReportError(f"more than 50000 runs where {query}: select fewer with --filter or --parent-run-id")
    runs = [r for r in runs if r.data.tags.get("sweep") != "true"]  # a multirun's parent (medvr.tracking.sweep)
    if not runs:
        raise ReportError(f"experiment {experiment!r} at {tracking_uri} has no runs where {query}")
    return client, runs


def run_config(client: mlflow.MlflowClient, run) -> dict[str, str]:
    """The run's params, completed by its flattened resolved config (CONFIG_ARTIFACT) where it has one."""
    if not any(f.path == CONFIG_ARTIFACT for f in client.list_artifacts(run.info.run_id)):
        return dict(run.data.params)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, CONFIG_ARTIFACT, tmp)
        return {**run.data.params, **json.loads(Path(path).read_text())}


def _factor_values(runs, full: list[dict[str, str]], by: list[str]) -> list[dict[str, str]]:
    """Each run's value of every factor: its tag of that name, else its config key of that name."""
    tags = {t for r in runs for t in r.data.tags if not t.startswith("mlflow.")}
    params = {k for c in full for k in c}
    unknown = [f for f in by if f not in tags | params]
    if unknown:
        raise ReportError(f"unknown factor(s) {unknown}: tags are {sorted(tags)}; config keys are {sorted(params)}")
    return [{f: (r.data.tags if f in tags else c).get(f, ABSENT) for f in by} for r, c in zip(runs, full)]


def _config(run, full: dict[str, str], by: list[str], ignore: tuple[str, ...]) -> dict[str, str]:
    """What a run is besides factors and seed: its config, and the option tag (`data=hf`) of each group not in `by`."""
    config = {
        k: v
        for k, v in full.items()
        if k not in SEED_KEYS and k not in by and not any(fnmatch.fnmatchcase(k, p) for p in ignore)
    }
    groups = {k.split("/", 1)[0] for k in config if "/" in k}
    return config | {t: v for t, v in run.data.tags.items() if t in groups and t not in by}


def _shown_keys(factors: list[dict], configs: list[dict]) -> list[str]:
    """The config keys that tell arms apart.

    Every key that differs between runs, except a `group/...` key whose value follows from its group's choice
    (a factor, or an option tag that is shown itself), e.g. `reward/terms/...` under --by reward. So runs that
    differ in any config key differ in a factor or a shown key: one arm never mixes two configs.
    """
    def value(i: int, key: str) -> str:
        return factors[i].get(key, configs[i].get(key, ABSENT))

    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({c.get(k, ABSENT) for c in configs}) > 1]
    groups = [*factors[0], *(k for k in differing if "/" not in k)]
    shown = []
    for key in differing:
        group = next((g for g in groups if key.startswith(f"{g}/")), None)
        pairs = {(value(i, group), value(i, key)) for i in range(len(configs))} if group else set()
        if group is None or len(pairs) > len({g for g, _ in pairs}):
            shown.append(key)
    return shown


def _metric_names(runs, patterns: list[str] | None) -> list[str]:
    """Metric keys matching `patterns` (names or fnmatch patterns); default: test accuracy, else validation accuracy."""
    available = sorted({k for r in runs for k in r.data.metrics})
    split = "test" if "test/acc" in available else "val"
    names = []
    for pattern in patterns or [f"{split}/acc", f"{split}/acc/*"]:
        matched = [k for k in available if fnmatch.fnmatchcase(k, pattern)]
        if not matched and (patterns or "*" not in pattern):
            raise ReportError(f"no run has a metric matching {pattern!r}; metrics are {available}")
        names += [k for k in matched if k not in names]
    return names


@dataclass
class Report:
    """The ablation table (one row per arm) and the runs behind it, with Markdown, CSV and plot output."""

    table: pd.DataFrame  # index: arm label; factors, config, runs, seeds, per metric mean/std/n (+ paired diff)
    runs: pd.DataFrame  # one row per run: arm, run_id, seed, metrics
    factors: list[str]
    metrics: list[str]
    baseline: str | None
    client: mlflow.MlflowClient = field(repr=False)

    def formatted(self) -> pd.DataFrame:
        """Readable cells: `mean ± std (n=k)` per metric and `Δ [95% CI] (pairs)` against the baseline."""
        t = self.table
        cells = {f: t[f] for f in self.factors} | ({"config": t["config"]} if t["config"].astype(bool).any() else {})
        cells["seeds"] = t["seeds"]
        for m in self.metrics:
            cells[m] = [_cell(mu, sd, n) for mu, sd, n in zip(t[m], t[f"{m} std"], t[f"{m} n"])]
        for m in self.metrics if self.baseline else ():
            diffs = t[[f"{m} diff", f"{m} ci_low", f"{m} ci_high", f"{m} pairs"]].to_numpy()
            cells[f"Δ {m}"] = ["baseline" if a == self.baseline else _diff_cell(*d) for a, d in zip(t.index, diffs)]
        return pd.DataFrame(cells, index=t.index)

    def to_markdown(self) -> str:
        frame = self.formatted().astype(str)
        rows = [list(frame.columns), ["---"] * frame.shape[1], *frame.to_numpy().tolist()]
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows)

    def to_csv(self, path) -> None:
        self.table.to_csv(path, index_label="arm")

    def plot_final(self, path, metric: str | None = None) -> None:
        """Per arm: the mean of `metric` with a std error bar, and one dot per run."""
        metric = metric or self.metrics[0]
        fig = Figure(figsize=(max(4.0, 1.2 * len(self.table)), 4.5), layout="constrained")
        ax = fig.subplots()
        for x, (arm, row) in enumerate(self.table.iterrows()):
            values = self.runs.loc[self.runs["arm"] == arm, metric].dropna().to_numpy()
            ax.errorbar(x, row[metric], yerr=np.nan_to_num(row[f"{metric} std"]), fmt="o", ms=9, capsize=6, color="C0")
            jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(len(values))
            ax.scatter(x + jitter, values, s=14, color="k", alpha=0.6, zorder=3)
        ax.set_xticks(range(len(self.table)), self.table.index, rotation=25, ha="right", fontsize=8)
        ax.set(ylabel=metric, title=f"{metric}: mean ± std over seeds, dots = runs")
        fig.savefig(path, format="png", dpi=120)

    def plot_curves(self, path, metric: str = "val/acc") -> None:
        """Per arm: the history of `metric` by step, mean over runs with a shaded ± std band."""
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.subplots()
        for color, arm in enumerate(self.table.index):
            ids = self.runs.loc[self.runs["arm"] == arm, "run_id"]
            points = [(m.step, m.value) for i in ids for m in self.client.get_metric_history(i, metric)]
            if points:
                by_step = pd.DataFrame(points, columns=["step", "value"]).groupby("step")["value"]
                mean, std = by_step.mean(), by_step.std().fillna(0.0)
                ax.plot(mean.index, mean, color=f"C{color}", label=f"{arm} (n={len(ids)})")
                ax.fill_between(mean.index, mean - std, mean + std, color=f"C{color}", alpha=0.2)
        if not ax.lines:
            logged = sorted(self.client.get_run(self.runs["run_id"].iloc[0]).data.metrics)
            raise ReportError(f"no run has a history of {metric!r}; a run's metrics are {logged}")
        ax.set(xlabel="step", ylabel=metric)
        ax.legend(fontsize=7)
        fig.savefig(path, format="png", dpi=120)


def _cell(mean: float, std: float, n: int) -> str:
    return "" if n == 0 else f"{mean:.3f} (n=1)" if n == 1 else f"{mean:.3f} ± {std:.3f} (n={n})"


def _diff_cell(diff: float, low: float, high: float, pairs: int) -> str:
    if pairs < 2:
        return f"{diff:+.3f} (1 pair, no CI)" if pairs else "unpaired (no shared seed)"
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}] ({int(pairs)} pairs)"


def build_report(
    tracking_uri: str,
    experiment: str = "medvr",
    by: list[str] | tuple[str, ...] = DEFAULT_BY,
    metrics: list[str] | None = None,
    baseline: str | dict[str, str] | None = None,
    on_mismatch: str = "split",
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    ignore: tuple[str, ...] = (),
) -> Report:
    """One row per arm (factor values + every other config difference), seeds averaged, paired diff to `baseline`."""
    if on_mismatch not in ("split", "refuse"):
        raise ReportError(f"on_mismatch={on_mismatch!r}: expected 'split' or 'refuse'")
    by = list(by)
    client, runs = finished_runs(tracking_uri, experiment, filter_string, parent_run_id)
    full = [run_config(client, r) for r in runs]
    factors = _factor_values(runs, full, by)
    configs = [_config(r, c, by, IGNORE + tuple(ignore)) for r, c in zip(runs, full)]
    shown = _shown_keys(factors, configs)
    names = _metric_names(runs, metrics)
    values = [{**f, **{k: c.get(k, ABSENT) for k in shown}} for f, c in zip(factors, configs)]
    if on_mismatch == "refuse":
        _refuse_mixed(factors, values, shown)
    labels = [" | ".join([*(v[f] for f in by), *(f"{k}={v[k]}" for k in shown)]) for v in values]
    per_run = pd.DataFrame({
        "arm": labels,
        "run_id": [r.info.run_id for r in runs],
        "seed": [r.data.params.get("seed", r.data.tags.get("seed")) for r in runs],
        **{m: [r.data.metrics.get(m, np.nan) for r in runs] for m in names},
    })
    rows = {}
    for arm, members in per_run.groupby("arm"):
        first = values[labels.index(arm)]
        seeds = ",".join(sorted(members["seed"].dropna(), key=lambda s: (len(s), s)))
        config = ", ".join(f"{k}={first[k]}" for k in shown)
        rows[arm] = {**{f: first[f] for f in by}, "config": config, "runs": len(members), "seeds": seeds}
        for m in names:
            got = members[m].dropna()
            rows[arm] |= {m: got.mean(), f"{m} std": got.std(ddof=1), f"{m} n": len(got)}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("arm")
    base = _baseline_arm(baseline, dict(zip(labels, values)), by + shown)
    if base is not None:
        _add_paired(table, per_run, base, names)
    return Report(table, per_run, by, names, base, client)


def _refuse_mixed(factors: list[dict], values: list[dict], shown: list[str]) -> None:
    """Raise, naming every factor combination whose runs differ in more than the seed, and in what."""
    groups: dict[tuple, list[dict]] = {}
    for f, v in zip(factors, values):
        groups.setdefault(tuple(f.items()), []).append(v)
    problems = []
    for group, members in groups.items():
        mixed = {k: sorted({v[k] for v in members}) for k in shown}
        detail = "; ".join(f"{k}: {', '.join(vs)}" for k, vs in mixed.items() if len(vs) > 1)
        if detail:
            problems.append(f"  {', '.join(f'{f}={x}' for f, x in group)} -> {detail}")
    if problems:
        raise ReportError(
            "runs of one factor combination differ in more than the seed:\n" + "\n".join(problems)
            + "\nadd the key to --by, select runs with --filter, --ignore it if meaningless, or --on-mismatch split"
        )


def _baseline_arm(spec: str | dict[str, str] | None, arms: dict[str, dict], keys: list[str]) -> str | None:
    """The one arm whose values match every `key=value` of `spec` (`reward=r1,explore=none` or a dict)."""
    if not spec:
        return None
    if isinstance(spec, str):
        pairs = [s.split("=", 1) for s in spec.split(",") if s]
        if any(len(p) != 2 for p in pairs):
            raise ReportError(f"baseline {spec!r}: expected key=value pairs joined by commas: reward=r1,explore=none")
        spec = dict(pairs)
    unknown = [k for k in spec if k not in keys]
    if unknown:
        raise ReportError(f"baseline key(s) {unknown}: a baseline names factors or keys that tell arms apart, {keys}")
    matches = sorted({arm for arm, values in arms.items() if all(values[k] == v for k, v in spec.items())})
    if len(matches) != 1:
        raise ReportError(f"baseline {spec} matches {len(matches)} arms {matches or sorted(arms)}; it must name one")
    return matches[0]


def _add_paired(table: pd.DataFrame, runs: pd.DataFrame, base: str, metrics: list[str]) -> None:
    """Per arm and metric: mean per-seed difference to `base`, its bootstrap 95% CI (>= 2 pairs) and the pair count."""
    per_seed = runs.groupby(["arm", "seed"])[metrics].mean()  # repeated runs of one seed averaged; no seed: unpaired
    for m in metrics:
        by_arm = {arm: s.droplevel("arm") for arm, s in per_seed[m].groupby(level="arm")}
        none = pd.Series(dtype=float)
        for arm in table.index:
            d = (by_arm.get(arm, none) - by_arm.get(base, none)).dropna().to_numpy() if arm != base else np.array([])
            low, high = bootstrap_ci(d) if len(d) >= 2 else (np.nan, np.nan)
            table.loc[arm, [f"{m} diff", f"{m} ci_low", f"{m} ci_high"]] = [d.mean() if len(d) else np.nan, low, high]
            table.loc[arm, f"{m} pairs"] = len(d)
        table[f"{m} pairs"] = table[f"{m} pairs"].astype(int)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    parser.add_argument("--experiment", default="medvr")
    parser.add_argument("--filter", help="MLflow filter string, e.g. \"params.`trainer/max_steps` = '200'\"")
    parser.add_argument("--parent-run-id", help="only the children of this sweep's parent run")
    parser.add_argument("--by", nargs="+", default=list(DEFAULT_BY), help="factors: option tags or param keys")
    parser.add_argument("--metrics", nargs="+", help="metric names or fnmatch patterns (default: test/acc, test/acc/*)")
    parser.add_argument("--baseline", help="the arm to compare against, e.g. reward=r1,explore=none")
    parser.add_argument("--on-mismatch", choices=["split", "refuse"], default="split")
    parser.add_argument("--ignore", nargs="+", default=[], help=f"param patterns to ignore besides {list(IGNORE)}")
    parser.add_argument("--markdown", action="store_true", help="print Markdown instead of a plain table")
    parser.add_argument("--markdown-out", type=Path)
    parser.add_argument("--csv-out", type=Path)
    parser.add_argument("--plots-dir", type=Path, help="writes final_<metric>.png per metric and curves_<metric>.png")
    parser.add_argument("--curve-metric", default="val/acc", help="the metric whose history --plots-dir draws")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.tracking_uri, args.experiment, args.by, args.metrics, args.baseline,
                              args.on_mismatch, args.parent_run_id, args.filter, tuple(args.ignore))
        print(report.to_markdown() if args.markdown else report.formatted().to_string(index=False))
        if args.markdown_out:
            args.markdown_out.write_text(report.to_markdown() + "\n")
        if args.csv_out:
            report.to_csv(args.csv_out)
        if args.plots_dir:
            args.plots_dir.mkdir(parents=True, exist_ok=True)
            for m in report.metrics:
                report.plot_final(args.plots_dir / f"final_{m.replace('/', '_')}.png", m)
            report.plot_curves(args.plots_dir / f"curves_{args.curve_metric.replace('/', '_')}.png", args.curve_metric)
    except ReportError as err:
        raise SystemExit(f"medvr.report: {err}") from None


if __name__ == "__main__":
    main()
