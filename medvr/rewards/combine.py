"""A weighted sum of reward terms, e.g. MedVLM-R1's accuracy + format (arXiv 2502.19634, max 2.0).

Summing before normalising matches TRL's default `multi_objective_aggregation="sum_then_normalize"`:
a term that returns None ("not applicable") is left out of a completion's total, and a completion
that no term applies to gets a NaN total, which `medvr.grpo.group_advantages` excludes from the
group statistics and gives advantage 0. Each term's raw values are returned for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

RewardFn = Callable[..., list[float | None]]


class WeightedSum:
    """total = sum of weights[name] * terms[name](completions, **columns), None terms skipped."""

    def __init__(self, terms: Mapping[str, RewardFn], weights: Mapping[str, float]) -> None:
        if set(terms) != set(weights):
            raise ValueError(
                f"reward terms {sorted(terms)} and weights {sorted(weights)} must name the same terms; "
                "give every term under `terms:` a weight under `weights:` in the reward config."
            )
        self.terms = dict(terms)
        self.weights = {name: float(weights[name]) for name in self.terms}

    @property
    def names(self) -> list[str]:
        return list(self.terms)

    def score(self, completions: list[str], **columns: object) -> tuple[list[float], dict[str, list[float | None]]]:
        """(weighted total per completion, NaN where every term is None; each term's raw values)."""
        raw = {name: list(term(completions, **columns)) for name, term in self.terms.items()}
        for name, values in raw.items():
            if len(values) != len(completions):
                raise ValueError(
                    f"reward term {name!r} returned {len(values)} values for {len(completions)} completions; "
                    "a reward function must return one value (or None) per completion."
                )
        totals = []
        for row in range(len(completions)):
            applied = [self.weights[name] * values[row] for name, values in raw.items() if values[row] is not None]
            totals.append(math.fsum(applied) if applied else float("nan"))
        return totals, raw

    def __call__(self, completions: list[str], **columns: object) -> list[float | None]:
        """TRL-compatible reward function: the weighted total, None where no term applies."""
        totals, _ = self.score(completions, **columns)
        return [None if math.isnan(total) else total for total in totals]
