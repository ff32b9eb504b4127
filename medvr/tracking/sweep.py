"""A multirun is one thing in MLflow: a parent run, the sweep's jobs its children, the ablation report its artifacts.

`SweepRun` is a Hydra callback (conf/hydra/default.yaml). At the sweep's start it opens the parent run,
named after the sweep directory and the swept keys, tagged `sweep=true` with the command line, and
exports its id as MEDVR_PARENT_RUN_ID: every job's `make_logger` (same process, or a launcher's worker
started after it) tags its run `mlflow.parentRunId`. `on_job_start` sets it again inside the job, for a
launcher whose jobs do not inherit the environment (submitit on a cluster that does not export it).
At the end it logs the ablation report of the FINISHED children (Markdown, CSV, the final-metric and
curve plots) and `failed_jobs.md`, and ends the parent: FINISHED, FAILED when no job finished, KILLED
when a job was interrupted. Hydra skips `on_multirun_end` when a job failed (the sweeper re-raises the
job's error), so the same ending is also registered to run at exit; it runs once, whichever comes first,
and never raises. It is registered with `threading`'s exit hooks, which run before `concurrent.futures` shuts
its thread pools down: a plain `atexit` hook runs after that, when MLflow can no longer download the
children's artifacts that the report reads, and the report of a sweep with a failed job was lost.
"""

from __future__ import annotations

import atexit
import os
import shlex
import sys
import tempfile
import threading
from pathlib import Path

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow import MlflowClient
from omegaconf import DictConfig

import medvr  # noqa: F401  (registers the `abspath` resolver that logger.tracking_uri uses)
from medvr.report import ReportError, build_report
from medvr.tracking.run import PARENT_ENV, SWEPT_ENV, artifact_location, note_experiment, store_lock, swept_overrides

# MLflow's limit on a tag value
TAG_LIMIT = 5000


def sweep_name(sweep_dir: str, swept: list[str]) -> str:
    """`sweep-<sweep dir name>[-<swept keys>]`, e.g. `sweep-14-03-22-reward,seed`."""
    return "-".join(["sweep", Path(sweep_dir).name, *([",".join(swept)] if swept else [])])


def sweep_status(statuses: list[str]) -> str:
    """The parent's status from its children's: KILLED if one was interrupted, FAILED if none finished or was pruned."""
    if "KILLED" in statuses:
        return "KILLED"
    return "FINISHED" if {"FINISHED", "PRUNED"} & set(statuses) else "FAILED"


def job_status(run) -> str:
    """A child's status; PRUNED for an Optuna trial its pruner stopped (KILLED in MLflow, medvr/tracking/pruning.py)."""
    return "PRUNED" if run.data.tags.get("optuna_state") == "PRUNED" else run.info.status


def failed_jobs(children) -> str:
    """Markdown list of the children that did not finish: run name, status and error."""
    lines = ["# jobs left out of the report", ""]
    for run in sorted(children, key=lambda r: r.info.run_name or ""):
        if run.info.status != "FINISHED":
            error = run.data.tags.get("error") or run.data.tags.get("killed_by") or "no error recorded"
            lines.append(f"- `{run.info.run_name}` {run.info.status}: {error.splitlines()[0]}")
    return "\n".join(lines) + "\n"


def _at_exit(hook) -> None:
    """Run `hook` when this process's main thread ends, before thread pools shut down (plain `atexit` where
    unavailable). Processes forked from this one (data workers) run the same exit hooks: there it does nothing."""
    pid = os.getpid()

    def here() -> None:
        if os.getpid() == pid:
            hook()

    register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9: what concurrent.futures itself uses
    (register or atexit.register)(here)


class SweepRun(Callback):
    """Hydra callback: the MLflow parent run of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.swept = ""
        self.uri = self.experiment = self.sweep_dir = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if rank_zero_only.rank != 0:  # a DDP rank that Lightning relaunched with the sweep's command line
            return
        self.uri, self.experiment = config.logger.tracking_uri, config.logger.experiment_name
        self.sweep_dir = str(config.hydra.sweep.dir)
        params = config.hydra.sweeper.get("params")
        swept = swept_overrides(list(config.hydra.overrides.task), dict(params) if params else None)
        self.swept = ",".join(swept)
        with store_lock(self.uri):
            self.client = MlflowClient(self.uri)
            found = self.client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(config)
            )
            note_experiment(self.client, experiment_id, config.logger.get("description"))
        tags = {
            "sweep": "true",
            "command": shlex.join(["python", *sys.argv])[:TAG_LIMIT],
            "sweep_dir": str(Path(self.sweep_dir).resolve()),
            "swept": self.swept,
        }
        run = self.client.create_run(experiment_id, run_name=sweep_name(self.sweep_dir, swept), tags=tags)
        self.run_id = run.info.run_id
        os.environ[PARENT_ENV], os.environ[SWEPT_ENV] = self.run_id, self.swept
        _at_exit(self.end)
        print(f"medvr: sweep parent run {self.run_id} (experiment '{self.experiment}')", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        # a launcher that runs jobs elsewhere (submitit: a SLURM node) pickles this callback with them;
        # its run id reaches the job even where the scheduler does not pass on the environment
        if self.run_id is not None:
            os.environ[PARENT_ENV], os.environ[SWEPT_ENV] = self.run_id, self.swept

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.end()

    def end(self) -> None:
        """Log the report and the failed jobs to the parent and end it; once, and never raising."""
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        if os.environ.get(PARENT_ENV) == run_id:
            del os.environ[PARENT_ENV]
            os.environ.pop(SWEPT_ENV, None)
        client = self.client
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
            query = f"tags.`mlflow.parentRunId` = '{run_id}'"
            children = client.search_runs([experiment_id], query, max_results=50_000)
            statuses = [job_status(r) for r in children]
            client.set_tag(run_id, "jobs", f"{statuses.count('FINISHED')}/{len(statuses)} finished")
            if len(children) > statuses.count("FINISHED"):
                client.log_text(run_id, failed_jobs(children), "failed_jobs.md")
            self._log_report(client, run_id)
            client.set_terminated(run_id, sweep_status(statuses))
        except Exception as err:  # the sweep's own exit must not fail on its summary
            print(f"medvr: could not end the parent run {run_id} ({type(err).__name__}: {err})", file=sys.stderr)
            try:
                client.set_tag(run_id, "report_error", f"{type(err).__name__}: {err}"[:TAG_LIMIT])
                client.set_terminated(run_id, "FAILED")
            except Exception:
                pass

    def _log_report(self, client: MlflowClient, run_id: str) -> None:
        """The ablation table (ablation.md, ablation.csv) and plots of the finished children, under `report/`.

        What cannot be built (no finished job, no metric to plot) is the `report_error` tag.
        """
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            try:
                report = build_report(self.uri, self.experiment, parent_run_id=run_id)
                (out / "ablation.md").write_text(report.to_markdown() + "\n")
                report.to_csv(out / "ablation.csv")
                metric = report.metrics[0]
                report.plot_final(out / f"final_{metric.replace('/', '_')}.png", metric)
                report.plot_curves(out / "curves_val_acc.png", "val/acc")
            except Exception as err:  # e.g. ReportError: no finished job, no metric to plot
                reason = str(err) if isinstance(err, ReportError) else f"{type(err).__name__}: {err}"
                client.set_tag(run_id, "report_error", reason[:TAG_LIMIT])
            if any(out.iterdir()):
                client.log_artifacts(run_id, str(out), "report")
