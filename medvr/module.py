"""GRPO as a LightningModule: rollouts -> rewards -> group advantages -> clipped loss -> step.

Manual optimisation, because one generation batch may feed several updates (mu > 1) and is
split into micro-batches whose losses must add up to the full-batch objective exactly.
The reference policy is the LoRA base with adapters disabled, or a frozen copy that is kept out
of the module's state dict (never checkpointed). Validation decodes greedily.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from PIL import ImageDraw

from medvr.algo import AlgoConfig
from medvr.answer_stats import ANSWERS, answer_counts, letter_stats, top_answer
from medvr.credit import entropy_credit, group_std, loss_mask, micro_weight, span_credit, span_mask
from medvr.distributed import mean_over_ranks, rank_weight, union_over_ranks
from medvr.grpo import group_advantages, masked_mean, policy_loss
from medvr.models.spec import ModelSpec, half_precision_trainable
from medvr.prompts import PromptBuilder
from medvr.rewards import WeightedSum
from medvr.rewards.answer import chosen_letter
from medvr.rollout.batch import Rollouts
from medvr.rollout.encode import vision_token_ids
from medvr.rollout.generate import NonFiniteError, token_logps
from medvr.scoring import Tally, score
from medvr.scoring import metrics as eval_metrics

log = logging.getLogger(__name__)

_EVAL_SEED = 20_240_611  # seeds the sampled evaluation (per batch), apart from the training seed
# dataset columns handed to reward functions (TRL passes every dataset column the same way)
REWARD_COLUMNS = ("id", "question", "options", "answer", "answer_type", "modality", "bbox", "boxes")


def _with_boxes(image, boxes: list) -> object:
    """The image with its rollout's zoom boxes drawn in (red), for the logged rollout pages."""
    if not boxes:
        return image
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    for box in boxes:
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 0, 0), width=2)
    return image


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        explore,
        reward: WeightedSum,
        prompt: PromptBuilder,
        algo: AlgoConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        samples_to_keep: int = 4,
        collapse_share: float = 0.8,
        eval_samples: int = 0,
    ):
        super().__init__()
        self.spec = model
        self.policy, self.processor = model.load()
        self.policy.train()
        self.register_buffer("forbidden_ids", torch.tensor(vision_token_ids(self.processor)), persistent=False)
        self.explore = explore
        self.reward = reward
        self.prompt = prompt
        self.algo = algo
        self.optimizer_factory = optimizer
        self.samples_to_keep = samples_to_keep
        self.collapse_share = collapse_share
        self.eval_samples = eval_samples
        self.automatic_optimization = False
        # a list hides the frozen copy from nn.Module registration: no state_dict, no checkpoint
        self._frozen_ref: list[torch.nn.Module] = []
        if algo.beta > 0 and not model.uses_lora:
            ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
            self._frozen_ref.append(ref)
        self.last_samples: list[dict] = []
        self._window: list[dict[str, float]] = []  # train metrics of the current accumulation window
        self._entropy_kept = 1.0  # fraction of policy tokens above the entropy quantile
        self._reward_stats: dict[str, float] = {}  # monitors of the last reward call (train/cca/*)
        self._eval = Tally()  # per group of eval rows (all, modality, question type, answer type): score sums
        self._sampled = Tally()  # the same over `eval_samples` sampled answers per row
        self._answers = torch.zeros(2, len(ANSWERS))  # [chosen, key] counts per answer letter (choice rows)
        self.nonfinite_steps = 0  # updates skipped because the loss or the gradient norm was NaN/inf
        self._nonfinite_in_a_row = 0
        self._grad_norm = math.nan

    # --- setup -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        for ref in self._frozen_ref:
            ref.to(self.device)

    def configure_optimizers(self):
        if half := half_precision_trainable(self.policy):
            lr = getattr(self.optimizer_factory, "keywords", {}).get("lr", "?")
            log.warning(
                "%s trainable parameters are stored in %s and updated in place: updates below ~2^-8 of a weight "
                "round away (optimizer.lr=%s). Train fp32 master weights with bf16 compute instead: "
                "model.dtype=float32 trainer.precision=bf16-mixed (or use LoRA, whose adapters stay fp32)",
                f"{sum(half.values()):,}", " and ".join(str(d).removeprefix("torch.") for d in half), lr,
            )
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return self.optimizer_factory(params)

    def _reference(self):
        """Context + model computing reference log-probs."""
        if self._frozen_ref:
            return nullcontext(), self._frozen_ref[0]
        return self.policy.disable_adapter(), self.policy

    # --- training ------------------------------------------------------------------------------
    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        algo = self.algo
        self.policy.eval()  # no dropout while sampling; logits must match the training forward
        try:
            rollouts = self.explore.rollout(
                self.policy, self.processor, self.prompt, batch, group_size=algo.group_size, temperature=algo.temperature
            )
        except NonFiniteError as err:
            raise NonFiniteError(self._diagnosis(str(err))) from err
        self.policy.train()
        columns = self._reward_columns(batch, rollouts)
        totals, terms = self.reward.score(rollouts.completions, **columns)
        rewards = torch.tensor(totals, dtype=torch.float32, device=self.device)  # [N]
        advantages = group_advantages(rewards, algo.group_size, scale=algo.scale_rewards, eps=algo.advantage_eps)
        mask = loss_mask(rollouts.loss_mask, rollouts.truncated, rewards, algo.group_size,
                         algo.mask_truncated_completions, algo.dynamic_sampling)  # [N, L]
        advantages, self._entropy_kept = entropy_credit(
            advantages, rollouts.entropies, mask, algo.top_entropy_quantile)  # [N] or [N, L]
        advantages = self._span_credit(rollouts, advantages, terms)  # [N] or [N, L]
        self._reward_stats = self.reward.stats(terms, rollouts.completions, **columns)

        old, ref = self._fixed_logps(rollouts)
        # under DDP, this rank's rows' part of the loss over every rank's rows (medvr/distributed.py)
        reduce_sum = lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        on_rank = rank_weight(mask, algo.loss_type, self.trainer.world_size, reduce_sum)
        opt = self.optimizers()
        parts_sum: dict[str, float] = defaultdict(float)
        for _ in range(algo.num_iterations):
            for lo, hi, mb in rollouts.micro_batches(algo.micro_batch_size):
                logps, _ = token_logps(self.policy, mb, algo.temperature, self.forbidden_ids)
                loss, parts = policy_loss(
                    logps,
                    None if old is None else old[lo:hi],
                    None if ref is None else ref[lo:hi],
                    advantages[lo:hi],  # [n] or [n, L]
                    mask[lo:hi],
                    loss_type=algo.loss_type,
                    epsilon_low=algo.epsilon_low,
                    epsilon_high=algo.epsilon_high,
                    beta=algo.beta,
                    importance_sampling_level=algo.importance_sampling_level,
                    max_completion_length=self.explore.max_new_tokens,
                    num_items=mask.sum(),
                )
                share = micro_weight(mask, lo, hi, algo.loss_type) * on_rank
                self.manual_backward(loss * share / algo.grad_accum)
                parts_sum["loss"] += loss.item() * share / algo.num_iterations
                for k, v in parts.items():
                    parts_sum[k] += v.item() * share / algo.num_iterations
            stepped = algo.num_iterations > 1 or (batch_idx + 1) % algo.grad_accum == 0
            if stepped:
                self._update(opt, parts_sum["loss"])
        self._log_train(rollouts, rewards, terms, parts_sum, stepped)
        self._keep_samples(batch, rollouts, rewards, terms)

    def _update(self, opt, loss: float) -> None:
        """Clip and apply the accumulated gradient, unless it or the loss is NaN/inf: then skip the update and count it."""
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self._grad_norm = float(norm)
        if math.isfinite(loss) and math.isfinite(self._grad_norm):
            if self.algo.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.algo.max_grad_norm, norm)
            opt.step()
            self._nonfinite_in_a_row = 0
        else:
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            log.warning("step %d: loss %s, gradient norm %s; update skipped", self.global_step + 1, loss, self._grad_norm)
            if self._nonfinite_in_a_row >= self.algo.max_nonfinite_steps:
                raise NonFiniteError(
                    self._diagnosis(
                        f"{self._nonfinite_in_a_row} updates in a row had a non-finite loss or gradient norm "
                        f"(last: loss {loss}, gradient norm {self._grad_norm}; algo.max_nonfinite_steps="
                        f"{self.algo.max_nonfinite_steps})"
                    )
                )
        opt.zero_grad(set_to_none=True)

    def _diagnosis(self, what: str) -> str:
        """What went non-finite, where, and the settings most likely at fault."""
        lr = self.optimizers().param_groups[0]["lr"]
        return (
            f"training stopped at step {self.global_step + 1}: {what}. The weights have diverged or overflowed; "
            f"the settings most likely at fault: optimizer.lr={lr:g} (lower it), model.dtype={self.spec.dtype} "
            f"(float16 overflows: use bfloat16 or float32), algo.max_grad_norm={self.algo.max_grad_norm} (clip), "
            f"algo.temperature={self.algo.temperature} (tiny temperatures blow up logits), algo.beta={self.algo.beta}."
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["medvr_nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_steps = checkpoint.get("medvr_nonfinite_steps", 0)

    def _reward_columns(self, batch: list[dict], rollouts: Rollouts) -> dict[str, list]:
        """Dataset columns per completion, plus its group (prompt) and the pixel boxes it zoomed into."""
        g = self.algo.group_size
        columns = {k: [r[k] for r in batch for _ in range(g)] for k in REWARD_COLUMNS}
        columns["group"] = [i // g for i in range(len(rollouts))]
        zooms = rollouts.extras.get("zooms", [[] for _ in range(len(rollouts))])
        columns["zoom_boxes"] = [[z.box for z in row if z.box is not None] for row in zooms]
        return columns

    def _span_credit(self, rollouts: Rollouts, advantages: torch.Tensor, terms) -> torch.Tensor:
        """CCA, credit=token: each span term's advantage on the zoom-action tokens only (medvr/credit.py)."""
        if not self.reward.span_terms:
            return advantages
        zooms = rollouts.extras.get("zooms", [])
        spans = span_mask(tuple(rollouts.loss_mask.shape), [[z.span for z in row] for row in zooms], self.device)
        algo = self.algo
        return span_credit(advantages, spans, {n: terms[n] for n in self.reward.span_terms}, self.reward.weights,
                           algo.group_size, algo.scale_rewards, algo.advantage_eps)

    @torch.no_grad()
    def _fixed_logps(self, rollouts: Rollouts):
        """Old log-probs (only when the batch is reused) and reference log-probs (only when beta > 0)."""
        old = ref = None
        if self.algo.num_iterations > 1:
            old = self._batched_logps(self.policy, rollouts)
        if self.algo.beta > 0:
            context, model = self._reference()
            with context:
                ref = self._batched_logps(model, rollouts)
        return old, ref

    def _batched_logps(self, model, rollouts: Rollouts) -> torch.Tensor:
        chunks = [
            token_logps(model, mb, self.algo.temperature, self.forbidden_ids)[0]
            for _, _, mb in rollouts.micro_batches(self.algo.micro_batch_size)
        ]
        return torch.cat(chunks)  # [N, L]

    def _log_train(self, rollouts: Rollouts, rewards, terms, parts: dict[str, float], stepped: bool) -> None:
        g = self.algo.group_size
        finite = rewards.nan_to_num(0.0)
        spread = group_std(rewards, g)  # [B]
        policy_mask = rollouts.loss_mask.float()
        metrics = {
            "train/loss": parts["loss"],
            "train/reward": finite.mean().item(),
            "train/reward_std": spread.mean().item(),
            "train/frac_reward_zero_std": (spread < 1e-6).float().mean().item(),
            "train/kl": parts["kl"],
            "train/clip_ratio/low": parts["clip_ratio/low"],
            "train/clip_ratio/high": parts["clip_ratio/high"],
            "train/completion_length": policy_mask.sum(1).mean().item(),
            "train/truncated_rate": rollouts.truncated.float().mean().item(),
            "train/entropy": masked_mean(rollouts.entropies, policy_mask).item(),
        }
        chosen = answer_counts([chosen_letter(c) for c in rollouts.completions])
        for name, value in letter_stats(chosen).items():
            metrics[f"train/answer/{name}"] = value
        for name, values in terms.items():
            known = [v for v in values if v is not None]
            if known:
                metrics[f"train/reward/{name}"] = sum(known) / len(known)
        for name, value in self.explore.stats(rollouts).items():
            metrics[f"train/explore/{name}"] = value
        for name, value in self._reward_stats.items():
            metrics[f"train/{name}"] = value
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["train/grad_norm"] = self._grad_norm
        metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
        if self.algo.top_entropy_quantile < 1.0:
            metrics["train/entropy_mask_frac"] = self._entropy_kept
        self._window.append(metrics)
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False, on_step=True, batch_size=1)
        if stepped:  # one point per optimiser step: the mean over its accumulation window
            keys = {k for m in self._window for k in m}
            mean = {k: sum(m[k] for m in self._window if k in m) / sum(k in m for m in self._window) for k in keys}
            self._log_at_step(mean_over_ranks(mean))
            self._window.clear()

    def _log_at_step(self, metrics: dict[str, float]) -> None:
        """Send metrics to the loggers with x = optimiser steps completed (0 = before training)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def _keep_samples(self, batch: list[dict], rollouts: Rollouts, rewards, terms) -> None:
        g = self.algo.group_size
        zooms = rollouts.extras.get("zooms", [[] for _ in range(len(rollouts))])
        self.last_samples = [
            {
                "id": batch[i // g]["id"],
                "image": _with_boxes(batch[i // g]["image"], [z.box for z in zooms[i] if z.box is not None]),
                "prompt": self.prompt.record_text(batch[i // g]),
                "answer": batch[i // g]["answer"],
                "completion": rollouts.completions[i],
                "reward": float(rewards[i]),
                "terms": {k: v[i] for k, v in terms.items()},
                "crops": rollouts.extras["crops"][i] if "crops" in rollouts.extras else [],
            }
            for i in range(min(self.samples_to_keep, len(rollouts)))
        ]

    # --- evaluation ------------------------------------------------------------------------------
    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    @torch.no_grad()
    def _eval_step(self, batch: list[dict], batch_idx: int) -> None:
        """Greedy decoding, each answer scored as MedVLM-R1's evaluation does (medvr/scoring.py); with
        `eval_samples` = k, also k answers per row sampled at the training temperature (what GRPO optimises)."""
        rollouts = self.explore.rollout(
            self.policy, self.processor, self.prompt, batch, group_size=1, temperature=1.0, greedy=True
        )
        for record, completion in zip(batch, rollouts.completions):
            scored = score(record, completion)
            self._eval.add(record, scored)
            if (record.get("answer_type") or "choice") == "choice":
                letter = scored.answer if scored.answer in ANSWERS else "-"
                self._answers[0, ANSWERS.index(letter)] += 1
                self._answers[1, ANSWERS.index(record["answer"])] += 1
        if self.eval_samples:
            k = self.eval_samples
            # the same draws at every evaluation (so before and after training are paired); training's RNG untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_EVAL_SEED + batch_idx)
                rollouts = self.explore.rollout(
                    self.policy, self.processor, self.prompt, batch, group_size=k, temperature=self.algo.temperature
                )
            for i, completion in enumerate(rollouts.completions):
                self._sampled.add(batch[i // k], score(batch[i // k], completion))

    def _log_eval(self, split: str) -> None:
        names, sums = self._summed(self._eval)
        answers = self.trainer.strategy.reduce(self._answers.to(self.device), reduce_op="sum").cpu()  # [2, A]
        metrics = eval_metrics(names, sums, split)
        metrics.pop(f"{split}/n", None)
        if self.eval_samples:  # the sampled answers' accuracies, as {split}/acc_sampled[/group]
            prefix = f"{split}/acc"
            metrics |= {
                f"{split}/acc_sampled{key.removeprefix(prefix)}": value
                for key, value in eval_metrics(*self._summed(self._sampled), split).items()
                if key == prefix or key.startswith(prefix + "/")
            }
        chosen = Counter({a: int(c) for a, c in zip(ANSWERS, answers[0]) if c > 0})
        keys = Counter({a: int(c) for a, c in zip(ANSWERS, answers[1]) if c > 0})
        stats = letter_stats(chosen, keys)
        for name, value in stats.items():
            metrics[f"{split}/answer/{name}"] = value
        self.log_dict(metrics, logger=False)  # for checkpoint monitors and callback_metrics
        self._log_at_step(metrics)
        self._eval.clear()
        self._sampled.clear()
        self._answers.zero_()
        if math.isfinite(metrics.get(f"{split}/acc", math.nan)):
            self.print(f"{split}/acc {metrics[f'{split}/acc']:.3f}  format {metrics[f'{split}/format']:.3f}")
        if stats and stats["top_share"] >= self.collapse_share:
            letter, _ = top_answer(chosen)
            log.warning(
                "%s: the policy gives the answer '%s' to %.0f%% of the questions (keys with that letter: %.0f%%): "
                "it has collapsed onto one letter, and its accuracy measures the key distribution, not reading",
                split, letter, 100 * stats["top_share"], 100 * stats["top_key_share"],
            )

    def _summed(self, tally: Tally) -> tuple[list[str], torch.Tensor]:
        """A tally's group names and score sums over every rank (the same rows on each)."""
        names, sums = tally.table(union_over_ranks(sorted(tally.sums)))
        return names, self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
