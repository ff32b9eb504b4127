"""medvr's Hydra sweeper over Optuna >= 4: `hydra/sweeper=medvr_optuna` (conf/hparams_search/grpo_optuna.yaml).

Hydra finds it by scanning the `hydra_plugins` namespace package; `config.py` registers its config.
"""
