"""The MLflow side of a run: logger creation, tags, the resolved config, failure records."""

from __future__ import annotations

import traceback
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

# config groups whose chosen option becomes an MLflow tag (filterable in the UI)
TAG_GROUPS = ("reward", "explore", "model", "data", "algo", "prompt", "experiment")


def make_logger(cfg: DictConfig, choices: dict[str, str | None]) -> MLFlowLogger:
    """MLFlowLogger with a readable run name and the option choices + seed as tags."""
    tags = {g: str(choices.get(g)) for g in TAG_GROUPS if choices.get(g) is not None}
    tags["seed"] = str(cfg.seed)
    run_name = cfg.logger.run_name or "-".join(
        str(choices.get(g)) for g in ("reward", "explore", "model", "algo") if choices.get(g)
    ) + f"-s{cfg.seed}"
    overrides = {"tags": tags, "run_name": run_name}
    uri = cfg.logger.tracking_uri
    if cfg.logger.artifact_location is None and uri.startswith("sqlite:"):
        overrides["artifact_location"] = str(Path(cfg.paths.output_dir).resolve() / "mlartifacts")
    return instantiate(cfg.logger, **overrides)


def log_config(logger: MLFlowLogger, cfg: DictConfig) -> None:
    """The resolved config, flattened as params and whole as config.yaml."""
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    container = OmegaConf.to_container(job_cfg, resolve=True)
    logger.log_hyperparams(container)
    logger.experiment.log_text(logger.run_id, OmegaConf.to_yaml(container), "config.yaml")


def record_failure(logger: MLFlowLogger, exc: BaseException) -> None:
    """Mark the run FAILED and keep the traceback next to it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    logger.experiment.log_text(logger.run_id, text, "error.txt")
    logger.experiment.set_tag(logger.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
    logger.finalize("failed")


def describe(logger: MLFlowLogger) -> str:
    uri = logger._tracking_uri
    hint = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    return f"MLflow run {logger.run_id} (experiment '{logger._experiment_name}'): {hint}"
