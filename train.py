"""Train a medical VLM with GRPO: python train.py [reward=cca explore=evr model=qwen2vl_2b ...] [-m]."""

import hydra
from omegaconf import DictConfig

import medvr  # noqa: F401  (registers the config resolvers)
from medvr.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg).get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
