"""`algo=sft`: supervised fine-tuning on the answer, the SFT baseline row of MedVLM-R1's table (arXiv 2502.19634).

The prompt is encoded exactly as a rollout encodes it (same chat template, images and system turn),
the target (the record's answer in the <think>/<answer> format the evaluation reads) follows with
the end-of-turn token, and the loss is the mean token cross-entropy over the target tokens. The
rest (model loading, optimiser, greedy evaluation, logging, non-finite guard, checkpoints, HF
export) is GRPOModule's, so SFT and GRPO rows are trained on the same items and measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medvr.explore.trajectory import Trajectory, assemble
from medvr.module import GRPOModule
from medvr.prompts import PromptBuilder
from medvr.rollout.batch import Rollouts
from medvr.rollout.encode import encode_prompts
from medvr.rollout.generate import token_logps


@dataclass(frozen=True)
class SFTConfig:
    # the assistant turn taught for a record; {answer} is its answer (a choice question's key letter)
    target: str
    # the chat template's end-of-turn token, appended to the target so the model learns to stop
    end_of_turn: str
    # training batches per optimiser step
    grad_accum: int
    # records per forward/backward pass
    micro_batch_size: int
    # gradient-norm clip; null disables
    max_grad_norm: float | None
    # consecutive skipped (non-finite) updates after which the run stops with a diagnosis
    max_nonfinite_steps: int

    def __post_init__(self):
        if "{answer}" not in self.target:
            raise ValueError(f"algo.target={self.target!r} must hold {{answer}}, where the record's answer goes.")
        if min(self.grad_accum, self.micro_batch_size, self.max_nonfinite_steps) < 1:
            raise ValueError("algo.grad_accum, algo.micro_batch_size and algo.max_nonfinite_steps must be >= 1.")

    @property
    def module_class(self) -> type:
        """The LightningModule that trains with these settings (medvr.train builds it)."""
        return SFTModule

    @property
    def beta(self) -> float:
        """SFT has no reference model (GRPOModule builds one only when beta > 0)."""
        return 0.0

    @property
    def temperature(self) -> float:
        """The cross-entropy is taken at temperature 1 (GRPOModule's non-finite diagnosis names it)."""
        return 1.0

    def target_text(self, record: dict) -> str:
        """The whole assistant turn taught for `record`, end-of-turn token included."""
        return self.target.format(answer=record["answer"]) + self.end_of_turn


def encode_targets(
    processor, prompt: PromptBuilder, records: list[dict], targets: list[str], system: str | None, device
) -> Rollouts:
    """Each record's prompt, encoded as a rollout encodes it, then its target; `loss_mask` is 1 on the target only.

    `completions` hold the targets decoded as a rollout decodes its completions (special tokens dropped).
    """
    enc = encode_prompts(processor, prompt, records, repeat=1, system=system)
    trajs = Trajectory.from_prompts(enc, records)
    tok = processor.tokenizer
    for traj, text in zip(trajs, targets, strict=True):
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        zeros = torch.zeros(len(ids))
        traj.add_policy(ids, logps=zeros, entropies=zeros, tokenizer=tok)
    return assemble(trajs, tok.pad_token_id, group_size=1, device=device)


def target_loss(model, batch: Rollouts, forbidden_ids: Tensor, num_items: Tensor) -> Tensor:
    """Summed cross-entropy of the target tokens / `num_items`, so micro-batch losses add up to the batch mean.

    The log-probs are the policy's as GRPO and the sampler define them: vision placeholder tokens are
    outside its vocabulary (no target contains them, so this only renormalises).
    """
    logps, _ = token_logps(model, batch, 1.0, forbidden_ids)  # [n, L], 0 off the target
    return -(logps * batch.loss_mask).sum() / num_items  # []


class SFTModule(GRPOModule):
    """GRPOModule with a teacher-forced training step: no reference model, no rollouts, no reward."""

    algo: SFTConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tok = self.processor.tokenizer
        ids = tok(self.algo.end_of_turn, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise ValueError(
                f"algo.end_of_turn={self.algo.end_of_turn!r} is not one token of model {self.spec.name}'s tokenizer "
                f"(it encodes to {ids}); set it to the chat template's end-of-turn token (Qwen: <|im_end|>)."
            )

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        algo = self.algo
        self.policy.train()
        targets = [algo.target_text(r) for r in batch]
        data = encode_targets(self.processor, self.prompt, batch, targets, self.explore.system, self.device)
        num_items = data.loss_mask.sum()
        loss_sum = 0.0
        for _, _, mb in data.micro_batches(algo.micro_batch_size):
            loss = target_loss(self.policy, mb, self.forbidden_ids, num_items)
            self.manual_backward(loss / algo.grad_accum)
            loss_sum += loss.item()
        stepped = (batch_idx + 1) % algo.grad_accum == 0
        if stepped:
            self._update(self.optimizers(), loss_sum)
        self._log_sft(loss_sum, float(num_items) / len(batch), stepped)

    def _log_sft(self, loss: float, target_length: float, stepped: bool) -> None:
        """One point per optimiser step, as GRPO logs: the loss is the mean over its accumulation window."""
        self._window.append({"train/loss": loss, "train/target_length": target_length})
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, batch_size=1)
        if not stepped:
            return
        metrics = {k: sum(m[k] for m in self._window) / len(self._window) for k in self._window[0]}
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["train/grad_norm"] = self._grad_norm
        metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
        self._log_at_step(metrics)
        self._window.clear()
