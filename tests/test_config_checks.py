"""`check_config` rejects out-of-domain values right after composition, naming key, value and range."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg
from medvr.config_checks import RULES, ConfigError, check_config

GROUPS = ("algo", "explore", "model", "data", "trainer", "rollout")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF) / g).glob("*.yaml"))]


def _compose(overrides: list[str], tmp_path: Path):
    extra = [f"data.path={tmp_path}/dataset"] if "data=hf" in overrides else []
    return compose_cfg([*overrides, *extra], tmp_path, tmp_path / "cache")


def _errors(overrides: list[str], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_config(_compose(overrides, tmp_path))
    return info.value.errors


# (overrides, what the single error line must contain: full key with the bad value, allowed range)
BAD = [
    (["algo.group_size=abc"], "algo.group_size='abc'", "an int >= 2"),
    (["algo.group_size=1"], "algo.group_size=1", "an int >= 2"),
    (["algo.group_size=4.0"], "algo.group_size=4.0", "an int >= 2"),
    (["algo.group_size=true"], "algo.group_size=True", "an int >= 2"),
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5", "an int >= 1 or -1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "an int >= 1 or -1"),
    (["algo.beta=-1"], "algo.beta=-1", "a finite number >= 0"),
    (["algo.temperature=0"], "algo.temperature=0", "a finite number > 0"),
    (["algo.temperature=nan"], "algo.temperature=nan", "a finite number > 0"),
    (["explore.max_new_tokens=0"], "explore.max_new_tokens=0", "an int >= 1"),
    (["explore.max_new_tokens=64.5"], "explore.max_new_tokens=64.5", "an int >= 1"),
    (["optimizer.lr=-1e-6"], "optimizer.lr=-1e-06", "a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf", "a finite number > 0"),
    (["algo.dynamic_sampling='true'"], "algo.dynamic_sampling='true'", "true or false"),
    (["model.freeze_vision=yes"], "model.freeze_vision='yes'", "true or false"),
    (["explore=tool", "explore.constrain_actions=1"], "explore.constrain_actions=1", "true or false"),
    (["rollout=cached", "rollout.continuous=no"], "rollout.continuous='no'", "true or false"),
    (["algo.loss_type=ppo"], "algo.loss_type='ppo'", "one of grpo | bnpo | dr_grpo | dapo"),
    (["algo.scale_rewards=std"], "algo.scale_rewards='std'", "one of group | batch | none"),
    (["algo.importance_sampling_level=seq"], "algo.importance_sampling_level='seq'", "one of token | sequence"),
    (["algo.top_entropy_quantile=0"], "algo.top_entropy_quantile=0", "a number in (0, 1]"),
    (["algo.max_grad_norm=0"], "algo.max_grad_norm=0", "null or a finite number > 0"),
    (["explore=evr", "explore.trigger.mode=max"], "explore.trigger.mode='max'", "absolute | normalized | quantile"),
    (["explore=evr", "explore.trigger.threshold=1.5"], "explore.trigger.threshold=1.5", "(0, 1) for explore.trigger"),
    (["explore=evr", "explore.trigger.branch=true", "algo.group_size=3"], "trigger.branch=true", "even algo.group"),
    (["explore=random_crop", "explore.trigger.rate=1.5"], "explore.trigger.rate=1.5", "a probability in [0, 1]"),
    (["explore=random_crop", "explore.trigger.min_frac=0.6"], "trigger.min_frac=0.6 > explore.trigger.max_frac=0.5",
     "min_frac <= max_frac"),
    (["model.warm_start.zoom.fraction=-0.1"], "model.warm_start.zoom.fraction=-0.1", "a probability in [0, 1]"),
    (["model.dtype=fp16"], "model.dtype='fp16'", "one of float32 | bfloat16 | float16 | auto"),
    (["model.min_pixels=20000"], "model.min_pixels=20000 > model.max_pixels=12544", "min_pixels <= max_pixels"),
    (["model.quantization=nf4"], "model.quantization=nf4", "needs model.lora"),
    (["data.batch_size=0"], "data.batch_size=0", "an int >= 1"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0", "an int >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1", "an int >= 0"),
    (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5", "an int >= 1 or a number in (0, 1]"),
    (["trainer.devices=0"], "trainer.devices=0", "an int >= 1 or -1 or auto"),
    (["trainer.precision=fp16"], "trainer.precision='fp16'", "bf16-mixed"),
    (["data.source.seed=abc"], "data.source.seed='abc'", "an int"),
    (["data.seed=${nope}"], "data.seed: cannot be read", "nope"),
]


@pytest.mark.parametrize(("overrides", "bad", "allowed"), BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_a_bad_value_is_one_error_naming_key_value_and_range(overrides, bad, allowed, tmp_path):
    errors = _errors(overrides, tmp_path)
    assert len(errors) == 1, errors
    assert bad in errors[0] and allowed in errors[0]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_passes_without_warnings(group, option, tmp_path):
    assert check_config(_compose([f"{group}={option}"], tmp_path)) == []


def test_the_paper_recipe_passes(tmp_path):
    assert check_config(_compose(["experiment=medvlm_r1"], tmp_path)) == []


def test_every_ruled_key_exists_in_some_shipped_option(tmp_path):
    """A typo in the rule table would silently check nothing: every key must name a real field."""
    seen: set[str] = set()
    for group, option in [*OPTIONS, ("experiment", "medvlm_r1")]:
        cfg = OmegaConf.to_container(_compose([f"{group}={option}"], tmp_path), resolve=False)

        def walk(node, prefix=""):
            for key, value in (enumerate(node) if isinstance(node, list) else node.items()):
                seen.add(f"{prefix}{key}")
                if isinstance(value, (dict, list)):
                    walk(value, f"{prefix}{key}.")

        walk(cfg)
    assert sorted(set(RULES) - seen) == []


def test_an_interpolated_key_reports_the_value_it_received(tmp_path):
    """data.seed is ${seed}: a bad global seed is named at both keys, so neither surprises the reader."""
    assert _errors(["seed=abc"], tmp_path) == ["seed='abc': expected an int", "data.seed='abc': expected an int"]


def test_all_errors_are_listed_at_once(tmp_path):
    overrides = ["algo.group_size=abc", "trainer.max_steps=1.5", "algo.beta=-1", "algo.temperature=0",
                 "explore.max_new_tokens=0", "data.batch_size=0"]
    with pytest.raises(ConfigError) as info:
        check_config(_compose(overrides, tmp_path))
    message = str(info.value)
    assert len(info.value.errors) == len(overrides)
    for override in overrides:
        key = override.split("=")[0]
        (line,) = [line for line in message.splitlines() if line.strip().startswith(f"- {key}=")]
        assert "expected" in line
    assert isinstance(info.value, ValueError) and message.startswith("6 invalid config value(s)")


def test_degenerate_settings_warn_and_are_returned(tmp_path, caplog):
    cfg = _compose(["algo.temperature=1e-8", "explore.max_new_tokens=4", "trainer.max_steps=3"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="medvr.config_checks"):
        warnings = check_config(cfg)
    assert len(warnings) == 3
    temperature, tokens, validation = warnings
    assert temperature.startswith("algo.temperature=1e-08 < 0.001") and "near-greedy" in temperature
    assert tokens.startswith("explore.max_new_tokens=4 < 16") and "<answer>" in tokens
    assert validation.startswith("trainer.val_check_interval=50") and "trainer.max_steps=3" in validation
    assert [r.getMessage() for r in caplog.records] == warnings


def test_validation_warning_counts_batches_not_steps(tmp_path):
    """50 batches at grad_accum=2 are 25 optimiser steps: max_steps=25 still validates once."""
    cfg = _compose(["trainer.max_steps=25", "algo.grad_accum=2"], tmp_path)
    assert check_config(cfg) == []
