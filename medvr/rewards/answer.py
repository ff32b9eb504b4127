"""Rule rewards of MedVLM-R1 (arXiv 2502.19634) for multiple-choice answers: accuracy and format.

Both follow TRL's reward contract: `fn(completions: list[str], **columns) -> list[float | None]`,
with dataset columns arriving as lists (`answer` holds the key letter of each row). Extra columns
are accepted and ignored, so the functions can be handed to TRL's GRPOTrainer unchanged.

Accuracy (max 1.0), on the text inside the last complete <answer>...</answer> pair:
- 1.0: it is exactly one option letter equal to the key: "B", "B)", "B.", "B:", "(B)", with any
  whitespace around; in this exact form a lower-case letter counts as its option ("b" is B);
- 0.5: it starts with the key letter as a standalone token (optionally after "(") followed by a
  non-alphanumeric character, e.g. "B) Left lung" or "B, because ...", and contains no other
  standalone option letter. "Standalone" means not adjacent to a letter or digit; the option letters
  are A.. up to the row's number of `options` when that column is given, else A-Z; only upper-case
  letters count in the rest of the text (so the article "a" is not option A);
- 0.0 otherwise: wrong letter, several letters ("A or B"), free text, no complete answer tag pair.
A row whose key is None is not scored (None).
Format (max 1.0): the stripped completion fullmatches `<think>.*?</think>\\s*<answer>.*?</answer>`
(DOTALL), the paper's regex; it is lenient about repeated tags inside the two blocks.
"""

from __future__ import annotations

import re
import string

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_EXACT = re.compile(r"\(\s*([A-Za-z])\s*\)|([A-Za-z])\s*[.):]?")
_LEADING = re.compile(r"\(?\s*([A-Z])(?![A-Za-z0-9])")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")


def extract_answer(text: str) -> str | None:
    """Stripped text inside the last complete <answer>...</answer> pair (pairs matched left to right), else None."""
    matches = _ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def chosen_letter(text: str) -> str | None:
    """The one option letter a completion's <answer> holds in exact form ("B", "(b)", "B."), upper-cased; else None."""
    answer = extract_answer(text)
    exact = _EXACT.fullmatch(answer) if answer is not None else None
    return (exact.group(1) or exact.group(2)).upper() if exact else None


def _option_letters(options: list[str] | None) -> str:
    return string.ascii_uppercase if options is None else string.ascii_uppercase[: len(options)]


def _key_letter(key: str, row: int) -> str:
    letter = key.strip().upper()
    if len(letter) != 1 or letter not in string.ascii_uppercase:
        raise ValueError(
            f"accuracy_reward expects the `answer` column to hold option letters such as 'B'; row {row} holds "
            f"{key!r}. Convert the dataset's answers to the letter of the correct option."
        )
    return letter


def answer_score(answer: str | None, key: str, letters: str = string.ascii_uppercase) -> float:
    """Accuracy of one extracted answer against the key letter (rules in the module docstring)."""
    if answer is None:
        return 0.0
    answer = answer.strip()
    exact = _EXACT.fullmatch(answer)
    if exact:
        return 1.0 if (exact.group(1) or exact.group(2)).upper() == key else 0.0
    leading = _LEADING.match(answer)
    if leading is None or leading.group(1) != key:
        return 0.0
    others = {letter for letter in _STANDALONE.findall(answer) if letter in letters and letter != key}
    return 0.0 if others else 0.5


def accuracy_reward(
    completions: list[str], answer: list[str | None], options: list[list[str]] | None = None, **_: object
) -> list[float | None]:
    """1.0 / 0.5 / 0.0 per completion against the key letter in `answer` (see the module docstring)."""
    rewards: list[float | None] = []
    for row, (completion, key) in enumerate(zip(completions, answer, strict=True)):
        if key is None:
            rewards.append(None)
            continue
        letters = _option_letters(None if options is None else options[row])
        rewards.append(answer_score(extract_answer(completion), _key_letter(key, row), letters))
    return rewards


def format_reward(completions: list[str], **_: object) -> list[float | None]:
    """1.0 when the whole completion is `<think>...</think>` then `<answer>...</answer>`, else 0.0."""
    return [1.0 if _FORMAT.fullmatch(completion.strip()) else 0.0 for completion in completions]
