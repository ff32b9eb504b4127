"""How one greedy answer is scored, and how scores add up to metrics: shared by val/test and eval.py.

- Choice questions: MedVLM-R1's test script (arXiv 2502.19634, src/eval/test_qwen2vl_med.py): the
  first `<answer>` tag holding a single upper-case letter, compared with the key. Stricter than the
  training reward, which also gives partial credit to "B) Left lung".
- Closed and open questions: normalised exact match (`rewards.answer.text_score`); open answers also
  get token F1 and token recall of the key, as VQA-RAD/SLAKE/PathVQA papers report them.
A completion is well formatted when it passes MedVLM-R1's format reward.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from medvr.rewards.answer import extract_answer, format_reward, normalize_text, text_score

_R1_LETTER = re.compile(r"<answer>\s*([A-Z])\s*</answer>")
_NOT_IN_METRIC_KEYS = re.compile(r"[^\w./\- :]")  # MLflow refuses other characters in metric keys
# per group of rows: correct, formatted, rows, F1 sum, recall sum, open rows (F1/recall denominators)
COLUMNS = ("correct", "format", "n", "f1", "recall", "n_open")


def medvlm_r1_letter(text: str) -> str | None:
    """The letter MedVLM-R1's evaluation extracts: the first `<answer> X </answer>` with one capital letter."""
    match = _R1_LETTER.search(text)
    return match.group(1) if match else None


def token_f1_recall(prediction: str | None, key: str) -> tuple[float, float]:
    """Token-overlap F1 and recall of the key's tokens (both after `normalize_text`); 0 for no prediction."""
    predicted = normalize_text(prediction or "").split()
    wanted = normalize_text(key).split()
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0, 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall), recall


@dataclass(frozen=True)
class Scored:
    correct: bool
    formatted: bool
    answer: str | None  # the letter (choice) or the <answer> text (closed/open) it gave; None if none
    f1: float | None = None  # open questions only
    recall: float | None = None


def score(record: dict, completion: str) -> Scored:
    """Score one completion against its record's key (rules in the module docstring)."""
    formatted = format_reward([completion])[0] == 1.0
    kind = record.get("answer_type") or "choice"
    if kind == "choice":
        letter = medvlm_r1_letter(completion)
        return Scored(letter is not None and letter == record["answer"], formatted, letter)
    answer = extract_answer(completion)
    correct = text_score(answer, record["answer"]) == 1.0
    if kind == "open":
        f1, recall = token_f1_recall(answer, record["answer"])
        return Scored(correct, formatted, answer, f1, recall)
    return Scored(correct, formatted, answer)


def groups_of(record: dict) -> list[str]:
    """The metric groups a row counts in: all rows, its modality, question type and answer type."""
    names = ["all", f"modality/{record['modality']}", f"answer_type/{record.get('answer_type') or 'choice'}"]
    if record.get("question_type"):
        names.append(f"type/{record['question_type']}")
    return names


class Tally:
    """Running sums of scores per group (`COLUMNS` per group name); `metrics` turns sums into rates."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(len(COLUMNS), dtype=torch.float64))

    def add(self, record: dict, scored: Scored) -> None:
        row = [float(scored.correct), float(scored.formatted), 1.0, scored.f1 or 0.0, scored.recall or 0.0,
               float(scored.f1 is not None)]
        for name in groups_of(record):
            self.sums[name] += torch.tensor(row, dtype=torch.float64)

    def table(self, names: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """Group names (sorted; or `names`, zeros for unseen ones) and their sums [M, len(COLUMNS)], e.g. to
        reduce over ranks."""
        names = sorted(self.sums) if names is None else names
        return names, torch.stack([self.sums[n] for n in names]) if names else torch.zeros(0, len(COLUMNS))

    def clear(self) -> None:
        self.sums.clear()


def metrics(names: list[str], sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """`prefix/acc`, `/format`, `/n`, `/f1` and `/recall` (open rows), and `prefix/acc/<modality>`,
    `prefix/acc/type/<type>`, `prefix/acc/answer_type/<type>` per group."""
    out: dict[str, float] = {}
    for name, row in zip(names, sums.tolist()):
        correct, formatted, n, f1, recall, n_open = row
        if name == "all":
            out |= {f"{prefix}/acc": correct / n, f"{prefix}/format": formatted / n, f"{prefix}/n": n}
            if n_open:
                out |= {f"{prefix}/f1": f1 / n_open, f"{prefix}/recall": recall / n_open}
        else:
            kind, _, value = name.partition("/")
            key = f"{prefix}/acc/{value}" if kind == "modality" else f"{prefix}/acc/{name}"
            out[_NOT_IN_METRIC_KEYS.sub("_", key)] = correct / n
    return out
