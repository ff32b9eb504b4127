"""`run(cfg)`: one training job from a composed config; `train.py` and the tests call it.

Order matters: the MLflow run is opened first (cheap), so a job that fails for any reason is
recorded as FAILED with its traceback; then every config group is instantiated and the
checkpoint located before the data is read, and the data is validated before the model is
loaded, so bad input fails before any expensive work.
"""

from __future__ import annotations

import gc
import os

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from medvr.module import GRPOModule
from medvr.tracking.run import describe, log_config, make_logger, record_failure


def _choices() -> dict[str, str | None]:
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, validate and test one configuration; return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    # MLFlowLogger exports its URI to MLFLOW_TRACKING_URI (mlflow.set_tracking_uri); restore it so the
    # next job in this process (multirun, tests) resolves its own `logger.tracking_uri`
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    logger = make_logger(cfg, _choices())
    log_config(logger, cfg)
    module = trainer = datamodule = None
    try:
        parts = {name: instantiate(cfg[name]) for name in ("algo", "reward", "prompt", "explore", "optimizer")}
        spec = instantiate(cfg.model)
        spec.check()
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        parts["reward"].check_data(datamodule.splits, datamodule.source.name)
        module = GRPOModule(model=spec, **parts)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
        trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
        if cfg.validate_before_training:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.test_after_training:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
        logger.finalize("success")
    except BaseException as exc:
        record_failure(logger, exc)
        raise
    finally:
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
        del module, trainer, datamodule
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(describe(logger), flush=True)
    return metrics
