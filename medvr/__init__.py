"""medvr: Hydra + Lightning experiments for RL on medical vision-language models."""
