"""Hydra's override grammar as an Optuna search space, and a trial's parameters back as overrides.

    choice(4, 8) / a,b           -> CategoricalDistribution
    range(2, 10, 2)              -> IntDistribution(2, 8, step=2) (like Python's range, the stop is excluded)
    interval(0.0, 0.1)           -> FloatDistribution(0.0, 0.1)
    tag(log, interval(1e-5, 1e-3)), tag(log, range(1, 64)) -> the same, sampled in the log domain
    anything else (lr=1e-4, reward=r1) is a fixed override passed to every trial.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

TAGS = {"log"}


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override (`override.is_sweep_override()`)."""
    sweep = override.value()
    tags = set(getattr(sweep, "tags", ()))
    if tags - TAGS:
        raise ValueError(f"{override.input_line}: unknown tag(s) {sorted(tags - TAGS)}; the sweeper knows {sorted(TAGS)}")
    log = "log" in tags
    if override.is_choice_sweep() or (override.is_range_sweep() and sweep.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if log:
            raise ValueError(f"{override.input_line}: tag(log, ...) needs a range or an interval, not a choice")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        values = list(sweep.range())
        if not values:
            raise ValueError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            return IntDistribution(min(values), max(values), log=log, step=1 if log else abs(sweep.step))
        if log:
            raise ValueError(f"{override.input_line}: tag(log, range(...)) needs integer bounds; use interval")
        return CategoricalDistribution(values)
    if override.is_interval_sweep():
        return FloatDistribution(sweep.start, sweep.end, log=log)
    raise ValueError(f"{override.input_line}: not a sweep the sweeper supports (choice, range, interval)")


def parse(params: dict[str, Any] | None, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str], list[str]]:
    """The search space, each parameter's override key (with its +/++ prefix) and the fixed overrides.

    `params` is hydra.sweeper.params (key -> grammar string); `arguments` the command line's overrides,
    which win over `params` for the same key: a sweep there replaces the config's, a plain value pins it.
    """
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    space: dict[str, BaseDistribution] = {}
    keys: dict[str, str] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        name = override.get_key_element().lstrip("+~")
        space.pop(name, None)
        fixed.pop(name, None)
        if override.is_sweep_override():
            space[name], keys[name] = distribution(override), override.get_key_element()
        else:
            fixed[name] = override.input_line
    return space, keys, list(fixed.values())


def as_overrides(params: dict[str, Any], keys: dict[str, str]) -> list[str]:
    """A trial's parameters as `key=value` overrides in Hydra's grammar (strings escaped)."""
    return [f"{keys[name]}={Override._get_value_element_as_str(value)}" for name, value in params.items()]
