"""medvr: Hydra + Lightning experiments for RL on medical vision-language models."""

from pathlib import Path

from omegaconf import OmegaConf

from medvr.explore.zoom import describe_box_scale

# `${abspath:...}` lets configs name files relative to the launch directory yet hand libraries
# (sqlite URIs, MLflow artifact roots) absolute paths.
OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()), replace=True)
# `${zoom_coordinates:${model.box_scale}}`: the zoom tool's instructions name the model's box convention
OmegaConf.register_new_resolver("zoom_coordinates", describe_box_scale, replace=True)
