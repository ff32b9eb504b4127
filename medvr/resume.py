"""Resuming a run from `last.ckpt`: what a checkpoint carries beyond Lightning's own state, and finding it.

Lightning restores weights, optimiser, global step and loop progress. medvr adds the RNG states
(rollouts sample from torch's global generator, so a resumed run draws the same samples), the
MLflow run id (the resumed job continues the same run) and the resolved config (resuming under
different settings would silently mix two experiments in one run, so it is refused).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.logger import _flatten_dict
import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from medvr.tracking.run import NOT_PARAMS, resolved

STATE_KEY = "medvr"
# settings that may differ between a run and its resumption: how long it trains, how it is shown
MAY_CHANGE = ("trainer.max_steps", "trainer.max_epochs", "trainer.enable_progress_bar", "trainer.enable_model_summary")


def config_items(cfg: DictConfig) -> dict[str, object]:
    """The resolved config as flat `key: value` pairs, without where-the-run-lives keys (paths, hydra, ckpt_path).

    Paths enter as placeholders (`<paths.run_dir>/checkpoints`): a resumed job runs in a new directory.
    """
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in cfg.get("paths", {}):
            cfg.paths[key] = f"<paths.{key}>"
    return _flatten_dict(resolved(cfg, NOT_PARAMS), delimiter=".")


def differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs, except those that may change on resume."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {saved.get(k, '<absent>')!r} -> {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != current.get(k, "<absent>") and k not in MAY_CHANGE
    ]


def _rng_state() -> dict:
    """Every RNG state as tensors and plain values: checkpoints load with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Stores the run id, the config and the RNG states in every checkpoint; restores the RNG on resume.

    The RNG is put back right before the first training batch after the restore, the exact point at
    which the interrupted run saved it (a step boundary), whatever the set-up in between consumed.
    """

    def __init__(self, run_id: str, config: dict[str, object]):
        self.run_id = run_id
        self.config = config
        self._pending: dict | None = None

    @property
    def state_key(self) -> str:
        return STATE_KEY

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "config": self.config, "rng": _rng_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict["rng"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None


@dataclass
class Resume:
    path: Path
    run_id: str
    config: dict[str, object]

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint lives in (`<run_dir>/checkpoints/last.ckpt`), if it does."""
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else None


def read(path: Path) -> Resume:
    """The medvr state of a checkpoint, read without loading its tensors (memory-mapped)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise ValueError(f"ckpt_path: {path} cannot be read as a checkpoint ({err}); it may be truncated") from err
    state = checkpoint.get("callbacks", {}).get(STATE_KEY)
    if state is None:
        raise ValueError(
            f"ckpt_path: {path} holds no medvr run state (weights-only, e.g. best.ckpt, or written by another "
            "program); resume from a run's checkpoints/last.ckpt"
        )
    return Resume(path=path, run_id=state["run_id"], config=state["config"])


def locate(cfg: DictConfig) -> Resume | None:
    """The checkpoint `ckpt_path` names: a file, a run directory, or `last` (newest last.ckpt of this config)."""
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    current = config_items(cfg)
    if str(value) == "last":
        return _newest(Path(cfg.paths.output_dir), current)
    path = Path(str(value)).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={value!r}: no checkpoint at {path}; pass <run dir>/checkpoints/last.ckpt, the run dir, or `last`"
        )
    resume = read(path)
    changed = differences(resume.config, current)
    if changed:
        raise ValueError(
            f"ckpt_path={value!r} was written with other settings; resume with the run's own overrides "
            "(or start a new run). Differences (checkpoint -> now):\n  " + "\n  ".join(changed)
        )
    return resume


def _newest(output_dir: Path, current: dict[str, object]) -> Resume:
    candidates = sorted(output_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            resume = read(path)
        except ValueError:
            continue
        if not differences(resume.config, current):
            return resume
    raise FileNotFoundError(
        f"ckpt_path=last: none of the {len(candidates)} last.ckpt files under {output_dir} was written with this "
        "config; pass the checkpoint's path instead"
    )
