"""Scoring of greedy answers (MedVLM-R1 letter extraction, exact match, token F1) and its sums per group."""

from __future__ import annotations

import pytest

from medvr.scoring import Tally, medvlm_r1_letter, metrics, score, token_f1_recall


@pytest.mark.parametrize(
    ("completion", "letter"),
    [
        ("<think>x</think><answer>B</answer>", "B"),
        ("<think>x</think><answer> C </answer>", "C"),
        ("<answer>A</answer> then <answer>B</answer>", "A"),  # the first tag, as their script's re.search
        ("<think>x</think><answer>b</answer>", None),  # lower case is not a letter there
        ("<think>x</think><answer>B) Left lung</answer>", None),  # the training reward's 0.5 case scores 0 here
        ("no tags B", None),
    ],
)
def test_medvlm_r1_letter_extraction(completion, letter):
    assert medvlm_r1_letter(completion) == letter


def test_token_f1_and_recall():
    assert token_f1_recall("the left lung", "Left lung") == (1.0, 1.0)
    f1, recall = token_f1_recall("left lower lung", "left lung")  # precision 2/3, recall 1
    assert recall == 1.0 and f1 == pytest.approx(0.8)
    assert token_f1_recall(None, "lung") == (0.0, 0.0)


def test_scores_sum_per_group_into_metrics():
    records = [
        {"answer": "B", "answer_type": "choice", "modality": "CT", "question_type": "side"},
        {"answer": "yes", "answer_type": "closed", "modality": "CT", "question_type": None},
        {"answer": "left lung", "answer_type": "open", "modality": "X-ray (PA)", "question_type": "side"},
    ]
    completions = ["<think>t</think><answer>B</answer>", "<think>t</think><answer>No</answer>",
                   "<answer>left lower lung</answer>"]
    tally = Tally()
    for record, completion in zip(records, completions):
        tally.add(record, score(record, completion))
    got = metrics(*tally.table(), "eval/x")
    assert got["eval/x/acc"] == pytest.approx(1 / 3) and got["eval/x/n"] == 3
    assert got["eval/x/format"] == pytest.approx(2 / 3)  # the open answer has no <think>
    assert got["eval/x/acc/CT"] == 0.5 and got["eval/x/acc/X-ray _PA_"] == 0.0  # MLflow-safe key
    assert got["eval/x/acc/type/side"] == 0.5
    assert got["eval/x/acc/answer_type/choice"] == 1.0 and got["eval/x/acc/answer_type/closed"] == 0.0
    assert got["eval/x/f1"] == pytest.approx(0.8) and got["eval/x/recall"] == 1.0  # open rows only
