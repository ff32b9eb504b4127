"""What an Optuna study's sweeper (hydra_plugins/medvr_optuna_sweeper) and its trials share: the env var
that hands a job its trial number, and the study's storage.

Kept free of Lightning and MLflow imports: Hydra imports the sweeper plugin at every start.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock
from optuna.storages import RDBStorage

# set by the sweeper for each job (hydra.job.env_set): the number of the Optuna trial the job runs
TRIAL_ENV = "MEDVR_OPTUNA_TRIAL"
# seconds a sqlite connection waits for another worker's write before "database is locked"
SQLITE_TIMEOUT_S = 60


def open_storage(url: str | None) -> RDBStorage | None:
    """The RDB storage at `url` (tables created on first use), or None (a study in memory) when `url` is None.

    A new sqlite file is created under a file lock next to it: workers that start at once on a fresh
    storage would otherwise race in the table creation.
    """
    if url is None:
        return None
    if not url.startswith("sqlite:"):
        return RDBStorage(url)
    database = Path(url.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})
