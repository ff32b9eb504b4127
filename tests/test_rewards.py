"""MedVLM-R1 rule rewards and their weighted sum, on hand-written completions."""

import functools
import math

import pytest

from medvr.rewards import WeightedSum, accuracy_reward, extract_answer, format_reward

OPTIONS = ["Left lung", "Right lung", "Heart", "Liver"]


def wrap(answer: str) -> str:
    return f"<think>The opacity sits in the right lower zone.</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1.0),
        (" B ", 1.0),
        ("b", 1.0),
        ("B)", 1.0),
        ("B.", 1.0),
        ("B:", 1.0),
        ("(B)", 1.0),
        ("( B )", 1.0),
        ("B) Right lung", 0.5),
        ("B because it is round", 0.5),
        ("B, because a lesion is seen", 0.5),
        ("(B) Right lung", 0.5),
        ("B) B", 0.5),
        ("A", 0.0),
        ("(C)", 0.0),
        ("A or B", 0.0),
        ("B or C", 0.0),
        ("B, not D", 0.0),
        ("Right lung", 0.0),
        ("The answer is B", 0.0),
        ("Bilateral", 0.0),
        ("b) right lung", 0.0),
        ("", 0.0),
    ],
)
def test_accuracy_rules(answer, expected):
    assert accuracy_reward([wrap(answer)], answer=["B"], options=[OPTIONS]) == [expected]


def test_accuracy_option_letters_come_from_options_column():
    # "I" is not an option among four, so "B because I ..." keeps its partial credit; without the
    # options column every capital letter counts as a possible option and the answer is ambiguous.
    completion = wrap("B because I see consolidation")
    assert accuracy_reward([completion], answer=["B"], options=[OPTIONS]) == [0.5]
    assert accuracy_reward([completion], answer=["B"]) == [0.0]


@pytest.mark.parametrize(
    "completion",
    [
        "<think>x</think><answer>B",  # unclosed
        "<think>x</think>",  # no answer at all
        "<think>x</think>B</answer>",  # no opening tag
        "<think>x</think><answer><answer>B</answer></answer>",  # nested: inner text is "<answer>B"
    ],
)
def test_accuracy_needs_a_complete_answer_pair(completion):
    assert accuracy_reward([completion], answer=["B"]) == [0.0]


def test_extract_answer_takes_the_last_complete_pair():
    assert extract_answer("<answer>A</answer> then <answer> B \n</answer>") == "B"
    assert extract_answer("<answer>A</answer><answer>B") == "A"
    assert extract_answer("<answer>\nB) Right\n</answer>") == "B) Right"
    assert extract_answer("<answer>B") is None
    assert extract_answer("no tags") is None
    assert accuracy_reward([wrap("A") + "<answer>B</answer>"], answer=["B"]) == [1.0]


def test_accuracy_none_key_is_not_scored_and_extra_columns_are_ignored():
    rewards = accuracy_reward(
        [wrap("B"), wrap("C")], answer=["b", None], options=[OPTIONS, OPTIONS], modality=["MRI", "CT"], prompts=["q"]
    )
    assert rewards == [1.0, None]


def test_accuracy_rejects_non_letter_keys():
    with pytest.raises(ValueError, match="row 1 holds 'Right lung'"):
        accuracy_reward([wrap("B"), wrap("B")], answer=["B", "Right lung"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>reasoning</think><answer>B</answer>", 1.0),
        ("  <think>a\nb</think>\n\n<answer>B) Right lung</answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("Sure! <think>a</think><answer>B</answer>", 0.0),
        ("<think>a</think><answer>B</answer> Hope this helps.", 0.0),
        ("<think>a</think> text <answer>B</answer>", 0.0),
        ("<answer>B</answer><think>a</think>", 0.0),
        ("<answer>B</answer>", 0.0),
        ("<think>x</think>", 0.0),
        ("<think>x</think><answer>B", 0.0),
        ("<think>x<answer>B</answer>", 0.0),
        # The paper's regex is lenient about repeated tags inside the blocks: documented behaviour.
        ("<think>x</think><answer><answer>B</answer></answer>", 1.0),
        ("<think>x</think><answer>A</answer><answer>B</answer>", 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion], answer=["B"]) == [expected]


def only_first_is_scored(completions, **_):
    return [0.25] + [None] * (len(completions) - 1)


def never_applies(completions, **_):
    return [None] * len(completions)


def test_weighted_sum_weights_terms_and_reports_raw_values():
    reward = WeightedSum(
        terms={"accuracy": functools.partial(accuracy_reward), "format": format_reward},
        weights={"accuracy": 2.0, "format": 0.5},
    )
    completions = [wrap("B"), "<answer>B) Right lung</answer>", wrap("A")]
    totals, raw = reward.score(completions, answer=["B", "B", "B"], options=[OPTIONS] * 3)
    assert reward.names == ["accuracy", "format"]
    assert raw == {"accuracy": [1.0, 0.5, 0.0], "format": [1.0, 0.0, 1.0]}
    assert totals == [2.5, 1.0, 0.5]
    assert reward(completions, answer=["B", "B", "B"], options=[OPTIONS] * 3) == totals


def test_weighted_sum_skips_none_terms_and_marks_unscorable_rows():
    reward = WeightedSum(
        terms={"sparse": only_first_is_scored, "never": never_applies}, weights={"sparse": 4.0, "never": 1.0}
    )
    totals, raw = reward.score(["a", "b"])
    assert totals[0] == 1.0 and math.isnan(totals[1])
    assert raw == {"sparse": [0.25, None], "never": [None, None]}
    assert reward(["a", "b"]) == [1.0, None]


def test_weighted_sum_validates_terms_and_lengths():
    with pytest.raises(ValueError, match="same terms"):
        WeightedSum(terms={"format": format_reward}, weights={"accuracy": 1.0})
    reward = WeightedSum(terms={"short": lambda completions, **_: [1.0]}, weights={"short": 1.0})
    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        reward.score(["a", "b"])


@pytest.mark.parametrize(
    ("answer", "key", "expected"),
    [
        ("Yes", "yes", 1.0),
        (" yes. ", "Yes", 1.0),
        ("no", "yes", 0.0),
        ("The left lung", "left lung", 1.0),  # articles, case and punctuation are ignored
        ("left lung, lower lobe", "left lung", 0.0),  # exact match, not containment
        ("A", "a", 1.0),  # an open answer "A" is text, not option A
    ],
)
def test_closed_and_open_answers_score_by_normalised_exact_match(answer, key, expected):
    completions = [wrap(answer)]
    assert accuracy_reward(completions, answer=[key], answer_type=["open"]) == [expected]
    assert accuracy_reward(completions, answer=[key], answer_type=["closed"]) == [expected]


def test_answer_types_mix_in_one_batch():
    completions = [wrap("B"), wrap("yes"), wrap("Right lung")]
    rewards = accuracy_reward(
        completions, answer=["B", "Yes", "right lung"], options=[OPTIONS, [], []], answer_type=["choice", "closed", "open"]
    )
    assert rewards == [1.0, 1.0, 1.0]
    assert accuracy_reward([wrap("no answer tag")[:-9]], answer=["yes"], answer_type=["closed"]) == [0.0]
