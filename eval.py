"""Evaluate a checkpoint without training it: python eval.py [model=... | run=<run dir or MLflow run id>] [data=... sets=[...]]."""

import hydra
from omegaconf import DictConfig

import medvr  # noqa: F401  (registers the config resolvers)
from medvr.evaluate import run


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
