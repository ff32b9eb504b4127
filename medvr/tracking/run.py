"""The MLflow side of a run: the logger, its name and tags, the resolved config, and its status.

medvr owns the run's lifecycle. Lightning finalises every logger with "success" at the end of
EACH stage (the pre-training `validate` included), which would mark a run FINISHED long before
it is; `RunLogger.finalize` therefore never ends the run, and `run()` ends it exactly once:
FINISHED after fit and test, FAILED with the traceback, or KILLED with the signal and the step.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

# config groups whose chosen option becomes an MLflow tag (filterable in the UI)
TAG_GROUPS = ("reward", "explore", "model", "data", "algo", "prompt", "experiment")
# groups whose option already appears in the run name
NAME_GROUPS = ("reward", "explore", "model", "algo")
# keys that never enter the params: they say where a run is, not what it is
NOT_PARAMS = ("hydra", "ckpt_path", "paths")


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that Lightning's per-stage `finalize` leaves the run status alone."""

    def finalize(self, status: str = "success") -> None:
        if self._initialized and self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)

    def end(self, status: str) -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self.experiment.set_terminated(self.run_id, status)


def swept_overrides(argv: list[str], sweeper_params: dict | None) -> list[str]:
    """Keys a multirun sweeps: command-line overrides in sweep syntax (`a=1,2`, `range(...)`) and sweep-file params."""
    parser = OverridesParser.create()
    keys = []
    for arg in argv:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception:  # flags such as -m, or not an override at all
            continue
        if override.is_sweep_override():
            keys.append(override.get_key_element())
    return keys + [k for k in (sweeper_params or {}) if k not in keys]


def run_name(cfg: DictConfig, choices: dict[str, str | None], swept: list[str]) -> str:
    """`reward-explore-model-algo-s<seed>`, plus `key=value` for every other swept override."""
    if cfg.logger.run_name:
        return cfg.logger.run_name
    base = "-".join(str(choices[g]) for g in NAME_GROUPS if choices.get(g))
    extra = []
    for key in swept:
        if key in NAME_GROUPS or key == "seed":
            continue
        value = choices.get(key) if key in choices else OmegaConf.select(cfg, key, default=None)
        extra.append(f"{key}={value}")
    return "-".join([base, *extra]) + f"-s{cfg.seed}"


def make_logger(cfg: DictConfig, choices: dict[str, str | None], swept: list[str], run_id: str | None = None) -> RunLogger:
    """The run's logger, its MLflow run created (or, resuming, reopened as RUNNING) before it returns.

    A new sqlite store is created and migrated under a file lock next to the database: processes
    that start at once on a fresh store would otherwise race in its alembic migration and leave it
    half-migrated (`table _alembic_tmp_tags already exists`).
    """
    tags = {g: str(choices.get(g)) for g in TAG_GROUPS if choices.get(g) is not None}
    tags["seed"] = str(cfg.seed)
    overrides = {"tags": tags, "run_name": run_name(cfg, choices, swept), "run_id": run_id}
    uri = cfg.logger.tracking_uri
    lock = None
    if uri.startswith("sqlite:"):
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{database}.lock")
        if cfg.logger.artifact_location is None:
            overrides["artifact_location"] = str(Path(cfg.paths.output_dir).resolve() / "mlartifacts")
    with lock if lock is not None else nullcontext():
        logger = instantiate(cfg.logger, **overrides)
        client = logger.experiment  # creates the store, the experiment and the run
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    return logger


def resolved(cfg: DictConfig, drop: tuple[str, ...] = ("hydra",)) -> dict:
    """The job's config resolved to plain containers, without the top-level keys in `drop`."""
    container = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    return {k: v for k, v in container.items() if k not in drop}


def log_config(logger: RunLogger, cfg: DictConfig, resumed: bool = False) -> None:
    """The resolved config, flattened as params and whole as config.yaml (a resumed run already has its params)."""
    if not resumed:
        logger.log_hyperparams(resolved(cfg, NOT_PARAMS))
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(resolved(cfg)), "config.yaml")


def record_failure(logger: RunLogger, exc: BaseException) -> None:
    """Mark the run FAILED and keep the traceback next to it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        logger.experiment.log_text(logger.run_id, text, "error.txt")
    except Exception as err:  # e.g. a read-only artifact root: the status and the tag still tell
        print(f"medvr: could not store error.txt ({err})", file=sys.stderr)
    logger.experiment.set_tag(logger.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
    logger.end("FAILED")


def record_kill(logger: RunLogger, signal_name: str, step: int, checkpoint: str | None) -> None:
    """Mark the run KILLED, with the signal, the optimiser step it stopped at and the checkpoint to resume from."""
    client = logger.experiment
    client.set_tag(logger.run_id, "killed_by", signal_name)
    client.set_tag(logger.run_id, "killed_at_step", str(step))
    if checkpoint:
        client.set_tag(logger.run_id, "resume_from", checkpoint)
    logger.end("KILLED")


def progress_summary(logger: RunLogger) -> str:
    """Start (first evaluation) and end (last evaluation, test) of every accuracy and answer-spread metric."""
    client, run_id = logger.experiment, logger.run_id
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(("val/acc", "val/answer/")))
    lines = ["what the run learned (first validation -> last validation | test):"]
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        test = client.get_run(run_id).data.metrics.get("test/" + key.removeprefix("val/"))
        end = f" | {test:.3f}" if test is not None else ""
        lines.append(f"  {key:<28} {history[0].value:.3f} -> {history[-1].value:.3f}{end}")
    return "\n".join(lines)


def describe(logger: RunLogger) -> str:
    uri = logger._tracking_uri
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    return f"MLflow run {logger.run_id} (experiment '{logger._experiment_name}'): {hint}"
