"""Rule rewards of MedVLM-R1 (arXiv 2502.19634): accuracy and format; accuracy also for yes/no and open answers.

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
Closed (yes/no) and open (free-text) rows (`answer_type` column) score 1.0 when the <answer> text
equals the key after normalisation (case, punctuation, articles a/an/the and extra spaces ignored),
else 0.0: the exact-match rule VQA-RAD, SLAKE and PathVQA papers report as closed accuracy.
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
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lower-cased, punctuation and articles removed, whitespace collapsed (SQuAD-style answer normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def extract_answer(text: str) -> str | None:
    """Stripped text inside the last complete <answer>...</answer> pair (pairs matched left to right), else None."""
    matches = _ANSWER.findall(text)
    return matches[-1].strip() if matches else None


def chosen_letter(text: str) -> str | None:
    """The one option letter a completion's <answer> holds in exact form ("B", "(b)", "B."), upper-cased; else None."""
    answer = extract_answer(text)
    exact = _EXACT.fullmatch(answer) if answer is not None else None
    return (exact.group(1) or exact.group(2)).upper() if exact else None


def chosen_answer(text: str, answer_type: str | None = None) -> str | None:
    """What a completion answers, comparable across rollouts and with `key_answer`: the option letter of a
    choice question (`chosen_letter`), the normalised <answer> text of a closed or open one; None if none."""
    if answer_type in (None, "choice"):
        return chosen_letter(text)
    answer = extract_answer(text)
    return normalize_text(answer) or None if answer is not None else None


def key_answer(key: str | None, answer_type: str | None = None) -> str | None:
    """The key in `chosen_answer`'s form: the upper-cased letter, or the normalised text."""
    if key is None:
        return None
    return key.strip().upper() if answer_type in (None, "choice") else normalize_text(key)


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


def text_score(answer: str | None, key: str) -> float:
    """Closed/open accuracy: 1.0 when the answer equals the key after `normalize_text`, else 0.0."""
    return float(answer is not None and normalize_text(answer) == normalize_text(key))


def accuracy_reward(
    completions: list[str],
    answer: list[str | None],
    options: list[list[str]] | None = None,
    answer_type: list[str | None] | None = None,
    **_: object,
) -> list[float | None]:
    """Per completion: 1.0 / 0.5 / 0.0 against the key letter of a choice row, 1.0 / 0.0 exact match for
    closed and open rows (see the module docstring). `answer_type` None (or a None entry) means choice."""
    rewards: list[float | None] = []
    for row, (completion, key) in enumerate(zip(completions, answer, strict=True)):
        if key is None:
            rewards.append(None)
        elif answer_type is not None and answer_type[row] not in (None, "choice"):
            rewards.append(text_score(extract_answer(completion), key))
        else:
            letters = _option_letters(None if options is None else options[row])
            rewards.append(answer_score(extract_answer(completion), _key_letter(key, row), letters))
    return rewards


def format_reward(completions: list[str], **_: object) -> list[float | None]:
    """1.0 when the whole completion is `<think>...</think>` then `<answer>...</answer>`, else 0.0."""
    return [1.0 if _FORMAT.fullmatch(completion.strip()) else 0.0 for completion in completions]
