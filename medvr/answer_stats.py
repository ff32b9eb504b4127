"""How the policy's chosen answer letters are spread: the signal of a collapse onto one letter.

A multiple-choice policy can collapse onto one letter; its accuracy is then just the share of keys
with that letter, and an overall accuracy hides it (DESIGN.md, pitfalls). The entropy of the
answer-letter distribution and the share of the most common answer show it at a glance.
"""

from __future__ import annotations

import math
from collections import Counter

from medvr.data.schema import LETTERS

NO_LETTER = "-"  # a completion without a single-letter answer counts as an answer of its own
ANSWERS = (*LETTERS, NO_LETTER)


def answer_counts(letters: list[str | None]) -> Counter:
    return Counter(NO_LETTER if letter is None else letter for letter in letters)


def letter_stats(answers: Counter, keys: Counter | None = None) -> dict[str, float]:
    """`entropy` (bits) of the answers, `top_share` of the most common one, and `top_key_share`: the
    share of keys equal to it (the accuracy a policy that always gave it would have)."""
    total = sum(answers.values())
    if total == 0:
        return {}
    entropy = -sum(c / total * math.log2(c / total) for c in answers.values() if c > 0)
    top, top_count = top_answer(answers)
    stats = {"entropy": entropy + 0.0, "top_share": top_count / total}
    if keys:
        stats["top_key_share"] = keys.get(top, 0) / sum(keys.values())
    return stats


def top_answer(answers: Counter) -> tuple[str, int]:
    """The most common answer (ties: alphabetically first) and its count."""
    return max(sorted(answers.items()), key=lambda kv: kv[1])
