"""Optuna pruning inside a trial: report the monitored metric at each validation during fit, stop when the pruner says so.

The study's sweeper (hydra_plugins/medvr_optuna_sweeper) gives each job its trial number as env
MEDVR_OPTUNA_TRIAL; without it (a single run) the callback does nothing. A pruned trial tags its MLflow
run `optuna_state=PRUNED` (with `killed_by`, `killed_at_step`) and raises `optuna.TrialPruned`: `run()`
then ends the run KILLED (it did not train to its budget, so the report leaves it out, but nothing
failed) and the sweeper tells the study PRUNED.
"""

from __future__ import annotations

import os

import lightning as L
import optuna
from lightning.pytorch.trainer.states import TrainerFn

from medvr.tracking.study import TRIAL_ENV, open_storage


class OptunaPruning(L.Callback):
    """Reports `monitor` to the job's Optuna trial after each validation of fit; raises TrialPruned when told to."""

    def __init__(self, monitor: str, study_name: str, storage: str | None, pruner: optuna.pruners.BasePruner | None):
        self.monitor, self.study_name, self.storage = monitor, study_name, storage
        self.pruner = pruner if pruner is not None else optuna.pruners.NopPruner()
        self.trial: optuna.Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        number = os.environ.get(TRIAL_ENV)
        if stage != "fit" or number is None or self.trial is not None or not trainer.is_global_zero:
            return
        if self.storage is None:
            raise ValueError(f"{TRIAL_ENV}={number} but hydra.sweeper.storage is null: a trial in another job can "
                             "report to an RDB storage only; set hydra.sweeper.storage (e.g. sqlite:///optuna.db)")
        storage = open_storage(self.storage)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
        self.trial = optuna.Trial(study, trial_id)
        if trainer.logger is not None:
            self.trial.set_user_attr("mlflow_run_id", trainer.logger.run_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or os.environ.get(TRIAL_ENV) is None:
            return
        prune, reason = False, ""
        if self.trial is not None:  # rank 0
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ValueError(f"the pruning callback monitors {self.monitor!r}, which this validation did not log; "
                               f"logged: {sorted(trainer.callback_metrics)}")
            step = trainer.global_step
            self.trial.report(float(value), step)
            prune = self.trial.should_prune()
            reason = f"trial {self.trial.number} pruned at step {step}: {self.monitor}={float(value):.4f}"
        if trainer.strategy.broadcast(prune, src=0):
            if trainer.logger is not None and trainer.is_global_zero:
                client, run_id = trainer.logger.experiment, trainer.logger.run_id
                for key, tag in (("optuna_state", "PRUNED"), ("killed_by", "optuna pruner"),
                                 ("killed_at_step", str(trainer.global_step))):
                    client.set_tag(run_id, key, tag)
            raise optuna.TrialPruned(reason)
