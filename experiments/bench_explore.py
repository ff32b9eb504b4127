"""Seconds per GRPO step of each explore option (and CCA) on the current machine.

    python experiments/bench_explore.py [--steps 20] [override ...]

Each option trains twice (a few warm-up steps, then warm-up + --steps); the difference of the two
wall times over --steps is the steady-state cost of a step: rollout (all turns), rewards, and the
policy update, without model loading or evaluation. Prints one row per option.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import medvr  # noqa: F401  (config resolvers)
from medvr.train import run

CONF = str(Path(__file__).resolve().parents[1] / "conf")
OPTIONS = [["explore=none"], ["explore=tool"], ["explore=evr"], ["explore=random_crop"], ["explore=evr", "reward=cca"]]
WARMUP = 3


def _timed(overrides: list[str], steps: int, out: Path) -> float:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.output_dir={out}",
                f"trainer.max_steps={steps}",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "validate_before_training=false",
                "test_after_training=false",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(out / "run")
    start = time.perf_counter()
    run(cfg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every option")
    args = parser.parse_args()
    os.environ.setdefault("MEDVR_CACHE", str(Path("outputs/cache").resolve()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _timed(args.overrides, 1, Path(tmp) / "build")  # builds the tiny model and the data once, untimed
        for i, option in enumerate(OPTIONS):
            overrides = [*option, *args.overrides]
            short = _timed(overrides, WARMUP, Path(tmp) / f"{i}a")
            long = _timed(overrides, WARMUP + args.steps, Path(tmp) / f"{i}b")
            rows.append((" ".join(option), (long - short) / args.steps))
    base = rows[0][1]
    print(f"\n{'option':<28} {'s/step':>8} {'x none':>7}")
    for name, sec in rows:
        print(f"{name:<28} {sec:8.3f} {sec / base:7.2f}")


if __name__ == "__main__":
    main()
