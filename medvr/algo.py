"""`algo=`: the GRPO-family settings the training step reads (the numbers live in conf/algo/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from medvr.grpo import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES


@dataclass(frozen=True)
class AlgoConfig:
    # completions sampled per prompt (G)
    group_size: int
    # sampling temperature; log-probs are always taken at this temperature
    temperature: float
    # k3 KL weight; 0 builds no reference model
    beta: float
    loss_type: str
    epsilon_low: float
    epsilon_high: float
    importance_sampling_level: str
    # advantage normalisation: group | batch | none
    scale_rewards: str
    # advantage epsilon: (r - mean) / (std + eps)
    advantage_eps: float
    # times each generation batch is reused (mu); old log-probs are computed only when > 1
    num_iterations: int
    # training batches per optimiser step
    grad_accum: int
    # trajectories per forward/backward
    micro_batch_size: int
    # gradient-norm clip; null disables
    max_grad_norm: float | None
    # drop truncated completions from the loss instead of penalising them
    mask_truncated_completions: bool
    # fraction rho of highest-entropy policy tokens that get the policy gradient (1.0 = all;
    # "Beyond the 80/20 rule", arXiv 2506.01939); the KL term still covers every token
    top_entropy_quantile: float
    # leave groups whose rewards are all equal out of the loss and its normalisation (DAPO)
    dynamic_sampling: bool
    # consecutive skipped (non-finite) updates after which the run stops with a diagnosis
    max_nonfinite_steps: int

    @property
    def module_class(self) -> type:
        """The LightningModule that trains with these settings (medvr.train builds it)."""
        from medvr.module import GRPOModule  # deferred: medvr.module imports this file

        return GRPOModule

    def __post_init__(self):
        checks = {
            "algo.loss_type": (self.loss_type, LOSS_TYPES),
            "algo.importance_sampling_level": (self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS),
            "algo.scale_rewards": (self.scale_rewards, ADVANTAGE_SCALES),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not one of {allowed}.")
        if self.group_size < 2:
            raise ValueError(f"algo.group_size={self.group_size}: GRPO needs at least 2 completions per prompt.")
        if self.num_iterations > 1 and self.grad_accum != 1:
            raise ValueError(
                "algo.num_iterations > 1 reuses one generation batch for several optimiser steps; "
                "set algo.grad_accum=1 (raise data.batch_size for a larger batch)."
            )
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"algo.top_entropy_quantile={self.top_entropy_quantile} must be in (0, 1].")
        if min(self.num_iterations, self.grad_accum, self.micro_batch_size, self.max_nonfinite_steps) < 1:
            raise ValueError(
                "algo.num_iterations, algo.grad_accum, algo.micro_batch_size and algo.max_nonfinite_steps must be >= 1."
            )
