"""The MLflow side of a run: the logger, its name and tags, the resolved config, and its status.

medvr owns the run's lifecycle. Lightning finalises every logger with "success" at the end of
EACH stage (the pre-training `validate` included), which would mark a run FINISHED long before
it is; `RunLogger.finalize` therefore never ends the run, and `run()` ends it exactly once:
FINISHED after fit and test, FAILED with the traceback, or KILLED with the signal and the step.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from medvr.report import CONFIG_ARTIFACT
from medvr.tracking.study import TRIAL_ENV

# config groups whose chosen option becomes an MLflow tag (filterable in the UI)
TAG_GROUPS = ("reward", "explore", "model", "data", "algo", "prompt", "experiment")
# groups whose option already appears in the run name
NAME_GROUPS = ("reward", "explore", "model", "algo")
# keys that never enter the config a run is compared by: they say where a run is, not what it is
NOT_PARAMS = ("hydra", "ckpt_path", "paths")
# a run's MLflow params, kept short for the UI's columns: these groups' chosen options ...
PARAM_GROUPS = ("reward", "explore", "model", "data", "algo")
# ... these hyper-parameters (dotted config keys; MLflow shows `optimizer/lr`) and every key the sweep varies.
# The whole resolved config is config.yaml, and flattened (what medvr.report compares runs by) config_flat.json.
PARAMS = (
    "seed",
    "optimizer.lr",
    "algo.group_size",
    "algo.beta",
    "algo.loss_type",
    "algo.temperature",
    "explore.max_new_tokens",
    "trainer.max_steps",
)
# set by the sweep's parent run (medvr.tracking.sweep) for its jobs: the run id they are children of
PARENT_ENV = "MEDVR_PARENT_RUN_ID"
# set with it: the keys the sweep sweeps, comma-separated (a job under submitit does not see the sweep's argv)
SWEPT_ENV = "MEDVR_SWEPT_KEYS"
NOTE_TAG = "mlflow.note.content"


class RunLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that Lightning's per-stage `finalize` leaves the run status alone.

    `description` becomes the experiment's description (make_logger); `params` are set by make_logger.
    """

    def __init__(self, *args, description: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.description = description
        self.params: dict[str, str] = {}

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


def run_params(cfg: DictConfig, choices: dict[str, str | None], swept: list[str]) -> dict[str, str]:
    """The run's params: the PARAM_GROUPS options, the PARAMS values and each swept key's value, keyed `a/b`."""
    params = {g: str(choices[g]) for g in PARAM_GROUPS if choices.get(g) is not None}
    for key in (*PARAMS, *swept):
        name = key.lstrip("+~").split("@")[0]  # `+key=...` adds, `group@package=...` places
        value = choices[name] if name in choices else OmegaConf.select(cfg, name, default=None)
        if value is not None and not OmegaConf.is_config(value):
            params[name.replace(".", "/")] = str(value)
    return params


def store_lock(uri: str):
    """A file lock next to a sqlite store (created and migrated under it), else a no-op context.

    Processes that start at once on a fresh store would otherwise race in its alembic migration
    and leave it half-migrated (`table _alembic_tmp_tags already exists`).
    """
    if not uri.startswith("sqlite:"):
        return nullcontext()
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{database}.lock")


def artifact_location(cfg: DictConfig) -> str | None:
    """Where a new experiment keeps artifacts: `logger.artifact_location`, else <output_dir>/mlartifacts for sqlite."""
    if cfg.logger.artifact_location is None and cfg.logger.tracking_uri.startswith("sqlite:"):
        return str(Path(cfg.paths.output_dir).resolve() / "mlartifacts")
    return cfg.logger.artifact_location


def note_experiment(client: MlflowClient, experiment_id: str, description: str | None) -> None:
    """Give the experiment `description` (MLflow's experiment note) unless it already has one."""
    if description and not client.get_experiment(experiment_id).tags.get(NOTE_TAG):
        client.set_experiment_tag(experiment_id, NOTE_TAG, description)


def make_logger(cfg: DictConfig, choices: dict[str, str | None], swept: list[str], run_id: str | None = None) -> RunLogger:
    """The run's logger, its MLflow run created (or, resuming, reopened as RUNNING) before it returns.

    In a multirun the run is a child of the sweep's parent run (PARENT_ENV, set by medvr.tracking.sweep);
    an Optuna trial's run is tagged with its trial number.
    """
    tags = {g: str(choices.get(g)) for g in TAG_GROUPS if choices.get(g) is not None}
    tags["seed"] = str(cfg.seed)
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    if os.environ.get(TRIAL_ENV):  # a trial of an Optuna study (hydra_plugins/medvr_optuna_sweeper)
        tags["optuna_trial"] = os.environ[TRIAL_ENV]
    overrides = {"tags": tags, "run_name": run_name(cfg, choices, swept), "run_id": run_id}
    overrides["artifact_location"] = artifact_location(cfg)
    with store_lock(cfg.logger.tracking_uri):
        logger = instantiate(cfg.logger, **overrides)
        logger.params = run_params(cfg, choices, swept)
        if rank_zero_only.rank != 0:  # a DDP rank > 0 (relaunched by Lightning): only rank 0 logs, it opens no run
            return logger
        client = logger.experiment  # creates the store, the experiment and the run
        note_experiment(client, logger.experiment_id, logger.description)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
    return logger


def resolved(cfg: DictConfig, drop: tuple[str, ...] = ("hydra",)) -> dict:
    """The job's config resolved to plain containers, without the top-level keys in `drop`."""
    container = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    return {k: v for k, v in container.items() if k not in drop}


def flat_config(cfg: DictConfig) -> dict[str, str]:
    """The resolved config without NOT_PARAMS, flattened and stringified as Lightning flattens params (`a/b`)."""
    return {k: str(v) for k, v in _flatten_dict(resolved(cfg, NOT_PARAMS)).items()}


def log_config(logger: RunLogger, cfg: DictConfig, resumed: bool = False) -> None:
    """The short params (a resumed run has them), the config whole as config.yaml and flattened as config_flat.json."""
    if not resumed:
        logger.log_hyperparams(logger.params)
    client = logger.experiment
    client.log_text(logger.run_id, OmegaConf.to_yaml(resolved(cfg)), "config.yaml")
    client.log_text(logger.run_id, json.dumps(flat_config(cfg), indent=1, sort_keys=True), CONFIG_ARTIFACT)


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
    """Start and end of every accuracy and answer-spread metric: first -> last validation, and the test
    split before (when `test_before_training` evaluated it) -> after training."""
    client, run_id = logger.experiment, logger.run_id
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(("val/acc", "val/answer/")))
    lines = ["what the run learned (validation: first -> last | test: before -> after training):"]
    width = max((len(k) - len("val/") for k in keys), default=0) + 1
    for key in keys:
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        tests = sorted(client.get_metric_history(run_id, "test/" + key.removeprefix("val/")), key=lambda m: m.step)
        end = f" | {' -> '.join(f'{m.value:.3f}' for m in tests[:1] + tests[1:][-1:])}" if tests else ""
        lines.append(f"  {key.removeprefix('val/'):<{width}}{history[0].value:.3f} -> {history[-1].value:.3f}{end}")
    return "\n".join(lines)


def describe(logger: RunLogger) -> str:
    uri = logger._tracking_uri
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    return f"MLflow run {logger.run_id} (experiment '{logger._experiment_name}'): {hint}"
