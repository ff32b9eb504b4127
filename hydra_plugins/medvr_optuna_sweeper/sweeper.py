"""A Hydra Sweeper that runs an Optuna (>= 4) study: ask a trial, launch it as a Hydra job, tell its outcome.

- The study lives in an RDB storage (`storage`, `study_name`): running the same command again continues it
  (trial numbers go on, each invocation adds `n_trials`), and workers started on the same storage share it.
- The objective is the job's return value (medvr: `optimized_metric` of the last validation). A job that
  raises, or returns no finite number, is a FAIL trial with its reason in the trial's `fail_reason`
  attribute; the study goes on, and the command fails only if every trial of this invocation failed.
  A job that raises `optuna.TrialPruned` is a PRUNED trial.
- Each job gets its trial number as env MEDVR_OPTUNA_TRIAL (`hydra.job.env_set`), which its MLflow run
  (tag `optuna_trial`) and the pruning callback (medvr/tracking/pruning.py) read.
- The sampler is re-created for every trial with seed + the number of trials the study holds, so a
  resumed study, or a second worker, does not replay the first invocation's random draws.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.medvr_optuna_sweeper.search_space import as_overrides, parse
from medvr.tracking.study import TRIAL_ENV, open_storage

log = logging.getLogger(__name__)


class MedvrOptunaSweeper(Sweeper):
    """`hydra/sweeper=medvr_optuna`: its options are MedvrOptunaSweeperConf's (config.py)."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig | None,
        pruner: DictConfig | None,
        params: DictConfig | None,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: expected maximize or minimize")
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials}, n_jobs={n_jobs}: both must be at least 1")
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler, self.pruner = sampler, pruner
        self.params = OmegaConf.to_container(params, resolve=True) if params is not None else None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> optuna.Study:
        space, keys, fixed = parse(self.params, arguments)
        if not space:
            raise ValueError("nothing to search: hydra.sweeper.params and the command line hold no choice/range/interval")
        study = optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            pruner=instantiate(self.pruner) if self.pruner is not None else optuna.pruners.NopPruner(),
            direction=self.direction,
            load_if_exists=True,
        )
        if study.direction.name.lower() != self.direction:
            raise ValueError(
                f"study '{self.study_name}' in {self.storage} is set to {study.direction.name.lower()}, the config says "
                f"{self.direction}: choose another hydra.sweeper.study_name"
            )
        log.info(f"Optuna study '{self.study_name}' ({self.storage or 'in memory'}): {len(study.trials)} trials so far, "
                 f"{self.n_trials} to run, {self.direction} {self.config.get('optimized_metric', 'the return value')}")
        outcomes: list[TrialState] = []
        while len(outcomes) < self.n_trials:
            trials = []
            for _ in range(min(self.n_jobs, self.n_trials - len(outcomes))):
                if self.sampler is not None:  # else Optuna's default sampler
                    study.sampler = self._sampler(len(study.get_trials(deepcopy=False)))
                trials.append(study.ask(space))
            jobs = [[*fixed, *as_overrides(t.params, keys), f"++hydra.job.env_set.{TRIAL_ENV}={t.number}"] for t in trials]
            try:
                returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
            except BaseException:  # an interrupt (SIGINT/SIGTERM stops medvr's job with SystemExit): none stays RUNNING
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            self.job_idx += len(returns)
            outcomes += [self._tell(study, trial, ret) for trial, ret in zip(trials, returns)]
        self._summarise(study, outcomes)
        if TrialState.COMPLETE not in outcomes and TrialState.PRUNED not in outcomes:
            raise RuntimeError(f"all {len(outcomes)} trials of this run failed; each trial's `fail_reason` says why")
        return study

    def _sampler(self, n_trials: int) -> optuna.samplers.BaseSampler:
        """The configured sampler, its seed (if any) offset by the study's trial count."""
        seed = self.sampler.get("seed")
        return instantiate(self.sampler, **({"seed": seed + n_trials} if seed is not None else {}))

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> TrialState:
        """Record one job's outcome in the study: COMPLETE with its value, PRUNED, or FAIL with the reason."""
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                log.info(f"trial {trial.number}: {value:.4f} with {trial.params}")
                return TrialState.COMPLETE
            metric = self.config.get("optimized_metric", "the objective")
            reason = f"the job returned {value!r} for {metric}, not a finite number (is it logged before the job ends?)"
        else:
            error = ret._return_value  # the job's exception (JobReturn.return_value would re-raise it)
            if isinstance(error, optuna.TrialPruned):
                study.tell(trial, state=TrialState.PRUNED)
                log.info(f"trial {trial.number}: pruned ({error})")
                return TrialState.PRUNED
            reason = f"{type(error).__name__}: {error}"
        trial.set_user_attr("fail_reason", reason[:5000])
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number}: FAIL, {reason.splitlines()[0]}")
        return TrialState.FAIL

    def _summarise(self, study: optuna.Study, outcomes: list[TrialState]) -> None:
        """Log the outcome and write <sweep dir>/optimization_results.yaml (the study's best trial so far)."""
        counts = {s.name: outcomes.count(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        results: dict[str, Any] = {"study_name": self.study_name, "storage": self.storage, "direction": self.direction,
                                   "this_run": counts, "trials_in_study": len(study.trials)}
        try:
            best = study.best_trial
            results |= {"best_trial": best.number, "best_value": best.value, "best_params": best.params}
            log.info(f"best trial {best.number}: {best.value:.4f} with {best.params}")
        except ValueError:  # no complete trial yet
            log.warning(f"study '{self.study_name}' has no complete trial")
        log.info(f"this run: {counts}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
