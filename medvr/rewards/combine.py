"""A weighted sum of reward terms, e.g. MedVLM-R1's accuracy + format (arXiv 2502.19634, max 2.0).

Summing before normalising matches TRL's default `multi_objective_aggregation="sum_then_normalize"`:
a term that returns None ("not applicable") is left out of a completion's total, and a completion
that no term applies to gets a NaN total, which `medvr.grpo.group_advantages` excludes from the
group statistics and gives advantage 0. Each term's raw values are returned for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

RewardFn = Callable[..., list[float | None]]
CREDITS = ("sequence", "token")


class WeightedSum:
    """total = sum of weights[name] * terms[name](completions, **columns), None terms skipped.

    With `credit="token"`, the `span_terms` (CCA's grounding reward) stay out of the total: the
    module turns them into group-normalised advantages on the zoom-action tokens only. With
    `credit="sequence"` they are summed into the total like any other term.
    """

    def __init__(
        self,
        terms: Mapping[str, RewardFn],
        weights: Mapping[str, float],
        credit: str = "sequence",
        span_terms: Sequence[str] = (),
    ) -> None:
        if set(terms) != set(weights):
            raise ValueError(
                f"reward terms {sorted(terms)} and weights {sorted(weights)} must name the same terms; "
                "give every term under `terms:` a weight under `weights:` in the reward config."
            )
        if credit not in CREDITS:
            raise ValueError(f"reward.credit={credit!r}: choose one of {CREDITS}")
        unknown = set(span_terms) - set(terms)
        if unknown:
            raise ValueError(f"reward.span_terms {sorted(unknown)} are not reward terms {sorted(terms)}")
        self.terms = dict(terms)
        self.weights = {name: float(weights[name]) for name in self.terms}
        self.credit = credit
        self.span_terms = list(span_terms) if credit == "token" else []

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
            applied = [
                self.weights[name] * values[row]
                for name, values in raw.items()
                if values[row] is not None and name not in self.span_terms
            ]
            totals.append(math.fsum(applied) if applied else float("nan"))
        return totals, raw

    def stats(self, raw: dict[str, list[float | None]], completions: list[str], **columns) -> dict[str, float]:
        """Monitoring metrics of the terms that keep them (e.g. cca/consensus_rate) for the last call."""
        out: dict[str, float] = {}
        for name, term in self.terms.items():
            if hasattr(term, "stats"):
                out |= term.stats(raw[name], completions=completions, **columns)
        return out

    def check_data(self, splits, where: str) -> None:
        """Fail before training when a term needs a column the data lacks (e.g. boxes for grounding_gt)."""
        for term in self.terms.values():
            if hasattr(term, "check_data"):
                term.check_data(splits, where)

    def __call__(self, completions: list[str], **columns: object) -> list[float | None]:
        """TRL-compatible reward function: the weighted total, None where no term applies."""
        totals, _ = self.score(completions, **columns)
        return [None if math.isnan(total) else total for total in totals]
