"""`run(cfg)`: one training job from a composed config; `train.py` and the tests call it.

Order matters: the MLflow run is opened first (cheap), so a job that fails for any reason is
recorded as FAILED with its traceback; then the config is checked, every group instantiated and
the checkpoint located before the data is read, and the data is validated before the model is
loaded, so bad input fails before any expensive work. The run ends exactly once: FINISHED when
fit and test are done, FAILED on an exception, KILLED on SIGINT/SIGTERM (exit code 130/143) or when an
Optuna pruner stops the trial (tag optuna_state=PRUNED; medvr/tracking/pruning.py).
`ckpt_path=<run dir>/checkpoints/last.ckpt` (or `last`) continues a run where it stopped, in the
same MLflow run.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict
from optuna import TrialPruned

from medvr import resume as resuming
from medvr.config_checks import check_config
from medvr.distributed import close_process_group
from medvr.signals import GracefulStop, Interrupted
from medvr.tracking.run import (
    SWEPT_ENV,
    describe,
    log_config,
    make_logger,
    progress_summary,
    record_failure,
    record_kill,
    swept_overrides,
)


# medvr's sampler continues an epoch from Lightning's restored progress (medvr/data/sampler.py)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# last.ckpt is meant to hold the state after the step's update (what a resumed run continues from)
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")


def _choices() -> dict[str, str | None]:
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def _swept() -> list[str]:
    """Keys this job's multirun sweeps (none outside a multirun)."""
    mode = HydraConfig.get().mode if HydraConfig.initialized() else None
    if mode is None or mode.name != "MULTIRUN":
        return []
    if (keys := os.environ.get(SWEPT_ENV)) is not None:  # from the sweep's parent run, wherever the job runs
        return [k for k in keys.split(",") if k]
    params = HydraConfig.get().sweeper.get("params")
    return swept_overrides(sys.argv[1:], dict(params) if params else None)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, validate and test one configuration (or continue one from `ckpt_path`); return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    # MLFlowLogger exports its URI to MLFLOW_TRACKING_URI (mlflow.set_tracking_uri); restore it so the
    # next job in this process (multirun, tests) resolves its own `logger.tracking_uri`
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    logger = module = trainer = datamodule = None
    stop = GracefulStop(checkpoint_dir=f"{cfg.paths.run_dir}/checkpoints")
    with stop.installed():
        try:
            settings = resuming.config_items(cfg)  # before the logger exports MLFLOW_TRACKING_URI
            resume = resuming.locate(cfg)
            if resume is not None and resume.run_dir is not None:  # keep writing into the run's own directory
                with open_dict(cfg):
                    cfg.paths.run_dir = str(resume.run_dir)
                stop.checkpoint_dir = resume.path.parent
            logger = make_logger(cfg, _choices(), _swept(), run_id=resume.run_id if resume else None)
            log_config(logger, cfg, resumed=resume is not None)  # a rejected config is still on record
            check_config(cfg)
            parts = {name: instantiate(cfg[name]) for name in ("algo", "reward", "prompt", "explore", "optimizer")}
            spec = instantiate(cfg.model)
            spec.check()
            datamodule = instantiate(cfg.data)
            datamodule.setup("fit")
            parts["reward"].check_data(datamodule.splits, datamodule.source.name)
            module = parts["algo"].module_class(
                model=spec, collapse_share=cfg.collapse_share, eval_samples=cfg.eval_samples, **parts)
            callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
            callbacks += [resuming.ResumeState(logger.run_id, settings), stop]
            trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
            # training draws from the seeded RNG whatever set-up consumed (a first run also builds the tiny model)
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            if cfg.validate_before_training and resume is None:
                trainer.validate(module, datamodule=datamodule, verbose=False)
            if cfg.test_before_training and cfg.test_after_training and resume is None:  # the start, at step 0
                trainer.test(module, datamodule=datamodule, verbose=False)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            if cfg.test_after_training:
                trainer.test(module, datamodule=datamodule, verbose=False)
                metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
            if rank_zero_only.rank == 0:  # the other DDP ranks hold no MLflow run
                print(progress_summary(logger), flush=True)
            logger.end("FINISHED")
        except BaseException as exc:
            if isinstance(exc, TrialPruned):  # the pruning callback tagged the run; the sweeper tells the study
                _record(logger, cfg, lambda lg: lg.end("KILLED"))
                raise
            signum = exc.signum if isinstance(exc, Interrupted) else stop.signum
            if signum is None:  # an error: FAILED, with the traceback
                _record(logger, cfg, lambda lg: record_failure(lg, exc))
                raise
            step = trainer.global_step if trainer is not None else 0
            saved = stop.saved
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signum, step)
            _record(logger, cfg, lambda lg: record_kill(lg, stopped.signal_name, step, saved))
            print(f"medvr: {stopped}; the run is KILLED", file=sys.stderr, flush=True)
            raise SystemExit(stopped.exit_code) from exc
        finally:
            if env_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_uri
            del module, trainer, datamodule
            close_process_group()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if rank_zero_only.rank == 0:
        print(describe(logger), flush=True)
    return metrics


def _record(logger, cfg: DictConfig, write) -> None:
    """End the run with `write`; if the failure came before the run existed, open a fresh run to hold it."""
    try:
        write(logger if logger is not None else make_logger(cfg, _choices(), _swept()))
    except Exception as err:  # the tracking store itself is unusable: say so, keep the original error
        print(f"medvr: could not record the run's end in MLflow ({type(err).__name__}: {err})", file=sys.stderr)
