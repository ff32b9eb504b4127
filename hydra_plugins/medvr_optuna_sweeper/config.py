"""The sweeper's config, registered as `hydra/sweeper=medvr_optuna`; conf/hparams_search/ files set medvr's values.

No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in sys.modules,
where a dataclass cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class MedvrOptunaSweeperConf:
    _target_: str = "hydra_plugins.medvr_optuna_sweeper.sweeper.MedvrOptunaSweeper"
    # the sweeper instantiates sampler and pruner itself (the sampler once per trial)
    _recursive_: bool = False
    # a study in `storage` with this name is continued
    study_name: str = MISSING
    # an RDB URL (sqlite:///..., postgresql://...); null keeps the study in memory: no resume, no pruning
    storage: str | None = None
    # maximize | minimize the task function's return value
    direction: str = MISSING
    # new trials per invocation
    n_trials: int = MISSING
    # trials asked at once and handed to the launcher together
    n_jobs: int = 1
    # an optuna sampler (_target_ + arguments); a `seed` is offset by the trial count of the study
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": None})
    # an optuna pruner (_target_ + arguments), or null
    pruner: Any = None
    # key -> value in Hydra's override grammar: choice(...), range(...), interval(...), tag(log, ...), or a fixed value
    params: dict[str, Any] | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="medvr_optuna", node=MedvrOptunaSweeperConf, provider="medvr"
)
