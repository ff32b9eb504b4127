"""medvr: Hydra + Lightning experiments for RL on medical vision-language models."""

from pathlib import Path

from omegaconf import OmegaConf

# `${abspath:...}` lets configs name files relative to the launch directory yet hand libraries
# (sqlite URIs, MLflow artifact roots) absolute paths.
OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()), replace=True)
