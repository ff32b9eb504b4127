"""Check the composed config's values against their domains before anything expensive runs.

A bad value (`algo.group_size=abc`, `trainer.max_steps=1.5`, `algo.temperature=0`) would otherwise
fail minutes later, after the model is loaded, with a message that names no config key, or not
at all. `check_config` reads every ruled key of the composed config, collects every problem and
raises one `ConfigError` listing them all, one line each with the full key, the value and the
allowed range; legal but degenerate settings are logged and returned as warnings. The numbers
themselves live in conf/*.yaml; this table holds only their domains. Keys absent from the chosen
options (explore.trigger under explore=none) are skipped.
"""

from __future__ import annotations

import logging
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medvr.data.synthetic import QUESTION_TYPES
from medvr.explore.triggers import THRESHOLD_MODES
from medvr.explore.zoom import RESIZED
from medvr.grpo import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from medvr.models.family import FAMILIES
from medvr.rollout.engines import CACHES

log = logging.getLogger(__name__)

# below this the sampling is near-greedy: a group's completions coincide and their advantages are ~0
NEAR_GREEDY_TEMPERATURE = 1e-3
# `<think>…</think><answer>X</answer><|im_end|>` does not fit in fewer policy tokens
MIN_ANSWER_TOKENS = 16
# what Lightning's Trainer accepts for `precision` (16, "bf16-mixed", "32-true", ...)
PRECISIONS = tuple(v for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal))
_ABSENT = object()


class ConfigError(ValueError):
    """One or more config values lie outside their domain; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} invalid config value(s); fix them (key=value overrides) and rerun:\n{lines}")


@dataclass(frozen=True)
class Rule:
    """A domain: `test(value)` says whether the value lies in it, `allowed` says so in words."""

    test: Callable[[Any], bool]
    allowed: str


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(min: int | None = None) -> Rule:
    return Rule(lambda v: _is_int(v) and (min is None or v >= min), "an int" + ("" if min is None else f" >= {min}"))


def number(min: float | None = None, max: float | None = None, min_open: bool = False, max_open: bool = False) -> Rule:
    def test(v) -> bool:
        if not _is_number(v):
            return False
        above = min is None or (v > min if min_open else v >= min)
        return above and (max is None or (v < max if max_open else v <= max))

    if min is not None and max is not None:
        allowed = f"a number in {'(' if min_open else '['}{min}, {max}{')' if max_open else ']'}"
    elif min is not None:
        allowed = f"a finite number {'>' if min_open else '>='} {min}"
    else:
        allowed = "a finite number"
    return Rule(test, allowed)


def probability() -> Rule:
    return Rule(number(0, 1).test, "a probability in [0, 1]")


def choice(*values) -> Rule:
    def test(v) -> bool:  # type-strict: True is not 1, and 16.0 is not the precision 16
        return any(type(v) is type(c) and v == c for c in values)

    words = " | ".join(dict.fromkeys(map(str, values)))  # 16 and "16" read alike
    return Rule(test, f"one of {words}" if len(values) > 1 else words)


def boolean() -> Rule:
    return Rule(lambda v: isinstance(v, bool), "true or false (unquoted)")


def matches(pattern: str, allowed: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None, allowed)


def sequence(rule: Rule) -> Rule:
    def test(v) -> bool:
        return isinstance(v, Sequence) and not isinstance(v, str) and len(v) > 0 and all(rule.test(x) for x in v)

    return Rule(test, f"a non-empty list, each {rule.allowed}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"null or {rule.allowed}")


def any_of(*rules: Rule) -> Rule:
    return Rule(lambda v: any(r.test(v) for r in rules), " or ".join(r.allowed for r in rules))


POSITIVE_INT = integer(min=1)
COUNT = integer(min=0)
POSITIVE = number(0, min_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1, min_open=True)  # (0, 1]
# zoom box coordinates: 0..N normalised, pixels of the resized model input, or null = original pixels
BOX_SCALE = optional(any_of(POSITIVE_INT, choice(RESIZED)))

RULES: dict[str, Rule] = {
    "seed": integer(),
    "validate_before_training": boolean(),
    "test_before_training": boolean(),
    "test_after_training": boolean(),
    "collapse_share": FRACTION,
    "eval_samples": COUNT,
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.betas.0": number(0, 1, max_open=True),
    "optimizer.betas.1": number(0, 1, max_open=True),
    # algo
    "algo.group_size": integer(min=2),
    "algo.temperature": POSITIVE,
    "algo.beta": NON_NEGATIVE,
    "algo.loss_type": choice(*LOSS_TYPES),
    "algo.epsilon_low": NON_NEGATIVE,
    "algo.epsilon_high": NON_NEGATIVE,
    "algo.importance_sampling_level": choice(*IMPORTANCE_SAMPLING_LEVELS),
    "algo.scale_rewards": choice(*ADVANTAGE_SCALES),
    "algo.advantage_eps": NON_NEGATIVE,
    "algo.num_iterations": POSITIVE_INT,
    "algo.grad_accum": POSITIVE_INT,
    "algo.micro_batch_size": POSITIVE_INT,
    "algo.max_grad_norm": optional(POSITIVE),
    "algo.mask_truncated_completions": boolean(),
    "algo.top_entropy_quantile": FRACTION,
    "algo.dynamic_sampling": boolean(),
    "algo.max_nonfinite_steps": POSITIVE_INT,
    # algo=sft
    "algo.target": matches(r"(?s).*\{answer\}.*", "a string holding {answer}"),
    "algo.end_of_turn": matches(r"\S+", "one token, such as <|im_end|>"),
    # explore
    "rollout.cache": choice(*CACHES),
    "rollout.compile": boolean(),
    "rollout.continuous": boolean(),
    "explore.max_new_tokens": POSITIVE_INT,
    "explore.max_turns": COUNT,
    "explore.max_total_tokens": optional(POSITIVE_INT),
    "explore.mask_over_turn": boolean(),
    "explore.constrain_actions": boolean(),
    "explore.trigger_at_eval": boolean(),
    "explore.trigger.mode": choice(*THRESHOLD_MODES),
    "explore.trigger.threshold": NON_NEGATIVE,
    "explore.trigger.span": POSITIVE_INT,
    "explore.trigger.min_tokens": COUNT,
    "explore.trigger.max_triggers": POSITIVE_INT,
    "explore.trigger.branch": boolean(),
    "explore.trigger.rate": probability(),
    "explore.trigger.min_frac": FRACTION,
    "explore.trigger.max_frac": FRACTION,
    "explore.env.box_scale": BOX_SCALE,
    "explore.env.image_factor": optional(POSITIVE_INT),
    "explore.env.min_side": POSITIVE_INT,
    "explore.env.upscale": POSITIVE,
    # model
    "model.dtype": choice("float32", "bfloat16", "float16", "auto"),
    "model.attn_implementation": choice("auto", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "eager"),
    "model.min_pixels": POSITIVE_INT,
    "model.max_pixels": POSITIVE_INT,
    "model.freeze_vision": boolean(),
    "model.gradient_checkpointing": boolean(),
    "model.quantization": optional(choice("nf4")),
    "model.box_scale": BOX_SCALE,
    "model.image_factor": POSITIVE_INT,
    "model.lora.r": POSITIVE_INT,
    "model.lora.lora_alpha": POSITIVE,
    "model.lora.lora_dropout": number(0, 1, max_open=True),
    "model.seed": integer(),
    "model.family": choice(*FAMILIES),
    "model.vocab_size": POSITIVE_INT,
    # tiny model architecture
    **{f"model.text.{k}": POSITIVE_INT for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads")},
    **{f"model.vision.{k}": POSITIVE_INT for k in ("depth", "embed_dim", "num_heads", "mlp_ratio")},
    "model.warm_start.items": COUNT,
    "model.warm_start.batch_size": POSITIVE_INT,
    "model.warm_start.steps": COUNT,
    "model.warm_start.lr": POSITIVE,
    "model.warm_start.answer_weight": POSITIVE,
    "model.warm_start.zoom.fraction": probability(),
    "model.warm_start.zoom.rate": probability(),
    "model.warm_start.zoom.jitter": NON_NEGATIVE,
    "model.warm_start.zoom.min_side": POSITIVE_INT,
    "model.warm_start.zoom.upscale": POSITIVE,
    "model.vision_pretraining.items": POSITIVE_INT,
    "model.vision_pretraining.steps": COUNT,
    "model.vision_pretraining.batch_size": POSITIVE_INT,
    "model.vision_pretraining.lr": POSITIVE,
    # data
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.num_workers": COUNT,
    "data.seed": integer(),
    "data.source.n_train": POSITIVE_INT,
    "data.source.n_val": POSITIVE_INT,
    "data.source.n_test": POSITIVE_INT,
    "data.max_image_pixels": optional(POSITIVE_INT),
    "data.source.seed": integer(),
    "data.source.question_types": optional(sequence(choice(*QUESTION_TYPES))),
    # trainer (lightning.pytorch.Trainer arguments)
    "trainer.accelerator": choice("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())),
    "trainer.devices": any_of(
        POSITIVE_INT, choice(-1), choice("auto"), matches(r"-1|\d+(,\d+)*,?", "a string like '0,1'"), sequence(COUNT)
    ),
    "trainer.precision": choice(*PRECISIONS),
    "trainer.max_steps": any_of(POSITIVE_INT, choice(-1)),
    "trainer.max_epochs": optional(integer(min=-1)),
    "trainer.val_check_interval": optional(any_of(POSITIVE_INT, FRACTION)),
    "trainer.check_val_every_n_epoch": optional(POSITIVE_INT),
    "trainer.limit_val_batches": optional(any_of(COUNT, probability())),
    "trainer.num_sanity_val_steps": integer(min=-1),
    "trainer.log_every_n_steps": optional(POSITIVE_INT),
    "trainer.enable_checkpointing": optional(boolean()),
    "trainer.deterministic": optional(any_of(boolean(), choice("warn"))),
    "trainer.enable_progress_bar": optional(boolean()),
    "trainer.enable_model_summary": optional(boolean()),
    "callbacks.last_checkpoint.every_n_train_steps": optional(POSITIVE_INT),
}

# (keys, holds(*values), message.format(*values)): checked when every key is present and in its domain
Relation = tuple[tuple[str, ...], Callable[..., bool], str]

RELATIONS: list[Relation] = [
    (("model.min_pixels", "model.max_pixels"), lambda lo, hi: lo <= hi,
     "model.min_pixels={0} > model.max_pixels={1}: need min_pixels <= max_pixels"),
    (("explore.trigger.min_frac", "explore.trigger.max_frac"), lambda lo, hi: lo <= hi,
     "explore.trigger.min_frac={0} > explore.trigger.max_frac={1}: need min_frac <= max_frac"),
    (("explore.trigger.mode", "explore.trigger.threshold"), lambda mode, t: mode == "absolute" or 0 < t < 1,
     "explore.trigger.threshold={1}: expected a number in (0, 1) for explore.trigger.mode={0} (nats: mode=absolute)"),
    (("explore.trigger.branch", "algo.group_size"), lambda branch, g: not branch or g % 2 == 0,
     "explore.trigger.branch=true needs an even algo.group_size, got {1}"),
    (("explore.env.box_scale", "explore.env.image_factor"), lambda scale, factor: scale != RESIZED or factor is not None,
     "explore.env.box_scale={0} needs explore.env.image_factor (set it to ${{model.image_factor}})"),
    (("model.quantization", "model.lora"), lambda q, lora: q is None or lora is not None,
     "model.quantization={0} needs model.lora (a 4-bit base trains adapters only): pick a *_lora model or set it"),
    (("algo.num_iterations", "algo.grad_accum"), lambda mu, accum: mu == 1 or accum == 1,
     "algo.num_iterations={0} reuses each batch for several optimiser steps: needs algo.grad_accum=1, got {1}"),
]

WARNINGS: list[Relation] = [
    (("algo.temperature",), lambda t: t >= NEAR_GREEDY_TEMPERATURE,
     f"algo.temperature={{0}} < {NEAR_GREEDY_TEMPERATURE}: near-greedy sampling, a group's completions "
     "coincide and their advantages are ~0"),
    (("explore.max_new_tokens",), lambda n: n >= MIN_ANSWER_TOKENS,
     f"explore.max_new_tokens={{0}} < {MIN_ANSWER_TOKENS}: too few policy tokens to reason and close "
     "<think>…</think><answer>X</answer>; most completions will be truncated"),
    # val_check_interval counts training batches; max_steps counts optimiser steps
    (("trainer.val_check_interval", "trainer.max_steps", "algo.grad_accum", "algo.num_iterations"),
     lambda every, steps, accum, mu: not _is_int(every) or steps == -1 or every <= math.ceil(steps * accum / mu),
     "trainer.val_check_interval={0} (training batches) exceeds what trainer.max_steps={1} runs (x algo.grad_accum="
     "{2} / algo.num_iterations={3} batches): validation never runs during training"),
]


def _read(cfg: DictConfig, key: str):
    """The resolved value at `key`, or `_ABSENT` when the chosen options do not have it."""
    return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)


def check_config(cfg: DictConfig) -> list[str]:
    """Raise `ConfigError` listing every out-of-domain value; log and return the degenerate-setting warnings."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    related = [k for keys, _, _ in RELATIONS + WARNINGS for k in keys]
    for key in dict.fromkeys([*RULES, *related]):
        try:
            value = _read(cfg, key)
        except OmegaConfBaseException as exc:
            errors.append(f"{key}: cannot be read ({str(exc).splitlines()[0]})")
            continue
        if value is _ABSENT:
            continue
        rule = RULES.get(key)
        if rule is not None and not rule.test(value):
            errors.append(f"{key}={value!r}: expected {rule.allowed}")
            continue
        values[key] = value

    def failing(relations: list[Relation]) -> list[str]:
        return [
            message.format(*(values[k] for k in keys))
            for keys, holds, message in relations
            if all(k in values for k in keys) and not holds(*(values[k] for k in keys))
        ]

    errors += failing(RELATIONS)
    if errors:
        raise ConfigError(errors)
    warnings = failing(WARNINGS)
    for warning in warnings:
        log.warning(warning)
    return warnings
