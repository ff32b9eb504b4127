"""Consensus-based Credit Assignment: IoU, fusion, majority vote, grounding rewards, token credit."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
from hydra.utils import instantiate

from conftest import FAST_MODEL, SMALL_DATA, TWO_STEPS, compose_cfg
from medvr.explore.trajectory import Zoom
from medvr.rewards.consensus import ConsensusAnswer, ConsensusGrounding, fuse, iou, majority_correct, majority_vote
from medvr.train import run


def _answer(letter: str) -> str:
    return f"<think>x</think><answer>{letter}</answer>"


# --- geometry ------------------------------------------------------------------------------------
def test_iou_edge_cases():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges: disjoint (x2 exclusive)
    assert iou([0, 0, 10, 10], [50, 50, 60, 60]) == 0.0
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)  # contained
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 0, 10], [0, 0, 10, 10]) == 0.0  # degenerate (zero width)
    assert iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0


def test_fuse_medoid_and_weighted_median():
    a, b, c = [0, 0, 10, 10], [1, 1, 11, 11], [2, 0, 12, 10]
    outlier = [80, 80, 90, 90]
    assert fuse([a, b, c, outlier], "medoid") == tuple(b)  # b overlaps a and c the most
    assert fuse([outlier, a, [1, 0, 11, 10], c], "medoid") == (1, 0, 11, 10)
    assert fuse([a, a, outlier, outlier], "medoid") == tuple(a)  # tie: the first
    median = fuse([a, b, c, outlier], "weighted_median")
    assert median == (1, 0, 11, 10)  # coordinate-wise; the outlier's weight is ~0
    assert fuse([a], "medoid") == tuple(a) and fuse([a], "weighted_median") == tuple(a)
    with pytest.raises(ValueError, match="fusion"):
        fuse([a], "mean")


def test_majority_vote_with_ties_and_missing_answers():
    assert majority_vote(["B", "A", "B", None]) == "B"
    assert majority_vote(["C", "A", "A", "C"]) == "A"  # tie: alphabetically first, whatever the order
    assert majority_vote(["A", "C", "C", "A"]) == "A"
    assert majority_vote([None, None]) is None


# --- grounding reward ------------------------------------------------------------------------------
def _grounding(**kw):
    args = dict(source="consensus", label_free=False, min_agree=2, fusion="medoid", aggregate="max") | kw
    return ConsensusGrounding(**args)


def test_consensus_from_successful_rollouts_only():
    good = [0, 0, 40, 40]
    completions = [_answer("A"), _answer("A"), _answer("B"), _answer("A")]
    boxes = [[good], [[2, 2, 42, 42]], [[100, 100, 140, 140]], []]
    term = _grounding()
    rewards = term(completions, group=[0, 0, 0, 0], zoom_boxes=boxes, answer=["A"] * 4)
    # the wrong rollout's box never votes; the successful one that did not zoom gets 0
    (consensus,) = term._last[0]
    assert consensus in (tuple(good), (2, 2, 42, 42))
    assert rewards[0] == pytest.approx(iou(good, consensus)) and rewards[3] == 0.0
    assert rewards[2] == 0.0
    stats = term.stats(rewards, completions=completions, group=[0] * 4, answer=["A"] * 4, bbox=[[0, 0, 40, 40]] * 4)
    assert stats["cca/consensus_rate"] == 1.0
    assert stats["cca/consensus_iou_to_gt"] == pytest.approx(iou(consensus, [0, 0, 40, 40]))


def test_too_few_agreeing_rollouts_give_no_consensus():
    completions = [_answer("A"), _answer("A"), _answer("B")]
    boxes = [[[0, 0, 10, 10]], [], [[0, 0, 10, 10]]]
    term = _grounding(min_agree=2)
    assert term(completions, group=[0, 0, 0], zoom_boxes=boxes, answer=["A"] * 3) == [None, None, None]
    assert term.stats([None] * 3)["cca/consensus_rate"] == 0.0


def test_mean_and_max_over_several_zooms():
    target = [0, 0, 10, 10]
    boxes = [[target], [target], [target, [50, 50, 60, 60]]]
    completions = [_answer("A")] * 3
    best = _grounding(aggregate="max")(completions, group=[0] * 3, zoom_boxes=boxes, answer=["A"] * 3)
    mean = _grounding(aggregate="mean")(completions, group=[0] * 3, zoom_boxes=boxes, answer=["A"] * 3)
    assert best[2] == 1.0 and mean[2] == 0.5


class _Untouchable(list):
    """An answer column that fails the test if anything reads it."""

    def __getitem__(self, item):
        raise AssertionError("label-free mode read the key")

    def __iter__(self):
        raise AssertionError("label-free mode read the key")


def test_label_free_mode_never_reads_the_key():
    completions = [_answer("C"), _answer("C"), _answer("A"), _answer("C")]
    boxes = [[[0, 0, 10, 10]], [[0, 0, 12, 12]], [[50, 50, 60, 60]], []]
    term = _grounding(label_free=True)
    rewards = term(completions, group=[0] * 4, zoom_boxes=boxes, answer=_Untouchable(["A"] * 4))
    assert rewards[2] < 0.1 and rewards[0] > 0.5  # C is the majority: the A rollout's box does not vote
    answer = ConsensusAnswer()(completions, group=[0] * 4, answer=_Untouchable(["A"] * 4))
    assert answer == [1.0, 1.0, 0.0, 1.0]
    stats = term.stats(rewards, completions=completions, group=[0] * 4, answer=["A"] * 4)
    assert stats["cca/majority_correct"] == 0.0  # the majority (C) is wrong here: monitoring reads the key


def test_groups_are_scored_separately():
    completions = [_answer("A"), _answer("A"), _answer("B"), _answer("B")]
    boxes = [[[0, 0, 10, 10]], [[0, 0, 10, 10]], [[0, 0, 10, 10]], [[0, 0, 10, 10]]]
    rewards = _grounding()(completions, group=[0, 0, 1, 1], zoom_boxes=boxes, answer=["A", "A", "A", "A"])
    assert rewards == [1.0, 1.0, None, None]


def test_ground_truth_source_uses_the_dataset_box(tmp_path, cache_dir):
    term = _grounding(source="gt")
    rewards = term([_answer("B")] * 2, group=[0, 0], zoom_boxes=[[[0, 0, 10, 10]], []], answer=["A"] * 2,
                   bbox=[[0, 0, 10, 20]] * 2)
    assert rewards == [0.5, 0.0]
    cfg = compose_cfg(["reward=grounding_gt", *SMALL_DATA], tmp_path, cache_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    reward = instantiate(cfg.reward)
    reward.check_data(datamodule.splits, "synthetic")  # synthetic rows all carry boxes
    no_box = datamodule.splits["train"].map(lambda r, i: {"bbox": [] if i == 3 else r["bbox"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"train row 3 .*has none"):
        reward.check_data({"train": no_box}, "synthetic")


# --- token-level credit ----------------------------------------------------------------------------
def test_token_credit_lands_exactly_on_zoom_spans(tmp_path, cache_dir):
    from medvr.module import GRPOModule
    from medvr.rollout.batch import Rollouts

    cfg = compose_cfg([*FAST_MODEL, "reward=cca", "explore=evr", "algo.beta=0"], tmp_path, cache_dir)
    parts = {name: instantiate(cfg[name]) for name in ("algo", "reward", "prompt", "explore", "optimizer")}
    module = GRPOModule(model=instantiate(cfg.model), **parts)
    n, length, g = 4, 12, parts["algo"].group_size
    assert n == g
    zooms = [[Zoom("a", span=(3, 6), forced=True)], [Zoom("b", span=(5, 9), forced=False)], [], []]
    rollouts = Rollouts(
        input_ids=torch.zeros(n, length, dtype=torch.long), attention_mask=torch.ones(n, length, dtype=torch.long),
        mm_token_type_ids=torch.zeros(n, length, dtype=torch.long), loss_mask=torch.ones(n, length, dtype=torch.long),
        gen_logps=torch.zeros(n, length), entropies=torch.zeros(n, length), truncated=torch.zeros(n, dtype=torch.bool),
        pixel_values=torch.zeros(1, 1), image_grid_thw=torch.ones(1, 3, dtype=torch.long),
        images_per_row=torch.zeros(n, dtype=torch.long), completions=[""] * n, group_size=g, extras={"zooms": zooms},
    )
    outcome = torch.tensor([0.5, -0.5, 1.0, -1.0])
    terms = {"grounding": [0.9, 0.1, 0.0, 0.0]}
    total = module._span_credit(rollouts, outcome, terms)  # [N, L]
    extra = total - outcome.unsqueeze(1)
    spans = torch.zeros(n, length, dtype=torch.bool)
    spans[0, 3:6] = True
    spans[1, 5:9] = True
    assert (extra[~spans] == 0).all()  # nowhere else
    grounding_adv = torch.tensor(terms["grounding"])
    expected = (grounding_adv - grounding_adv.mean()) / (grounding_adv.std() + 1e-4)
    assert torch.allclose(extra[0, 3:6], expected[0].expand(3)) and torch.allclose(extra[1, 5:9], expected[1].expand(4))
    # credit=sequence: the grounding reward joins the scalar reward instead
    sequence = instantiate(cfg.reward, credit="sequence")
    totals, _ = sequence.score([_answer("A")] * 2, answer=["A", "A"], group=[0, 0], zoom_boxes=[[[0, 0, 9, 9]]] * 2)
    assert totals == [3.0, 3.0] and not sequence.span_terms
    token = instantiate(cfg.reward)
    totals, raw = token.score([_answer("A")] * 2, answer=["A", "A"], group=[0, 0], zoom_boxes=[[[0, 0, 9, 9]]] * 2)
    assert totals == [2.0, 2.0] and raw["grounding"] == [1.0, 1.0] and not math.isnan(totals[0])


def test_two_training_steps_of_cca_with_evr(tmp_path, cache_dir):
    cfg = compose_cfg(
        [*TWO_STEPS, "reward=cca", "explore=evr", "reward.terms.grounding.min_agree=1"], tmp_path, cache_dir
    )
    run(cfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["reward"] == "cca"
    metrics = found.data.metrics
    assert 0.0 <= metrics["train/cca/consensus_rate"] <= 1.0
    assert "train/explore/trigger_rate" in metrics
    history = client.get_metric_history(found.info.run_id, "train/cca/consensus_rate")
    assert len(history) == 2


def test_grounding_gt_without_the_questions_box_scores_the_best_matching_named_box():
    organs = [{"name": "Liver", "bbox": [0, 0, 40, 40]}, {"name": "Heart", "bbox": [60, 60, 100, 100]}]
    term = _grounding(source="gt")
    completions = [_answer("A")] * 3
    zooms = [[[60, 60, 100, 100]], [[0, 0, 20, 40]], []]
    rewards = term(completions, group=[0, 0, 0], zoom_boxes=zooms, answer=["A"] * 3, bbox=[None] * 3, boxes=[organs] * 3)
    assert rewards == [1.0, pytest.approx(0.5), 0.0]  # each zoom is scored against the organ it matches best
    # the question's own box wins over the named boxes
    named = term(completions, group=[0, 0, 0], zoom_boxes=zooms, bbox=[[0, 0, 40, 40]] * 3, boxes=[organs] * 3)
    assert named == [0.0, pytest.approx(0.5), 0.0]
    # no box of any kind: not scored
    assert term(completions, group=[0, 0, 0], zoom_boxes=zooms, bbox=[None] * 3, boxes=[[]] * 3) == [None] * 3


def test_consensus_of_open_answers_compares_normalised_text():
    completions = ["<think>x</think><answer>The Liver.</answer>", "<think>y</think><answer>liver</answer>",
                   "<think>z</think><answer>spleen</answer>"]
    zooms = [[[0, 0, 40, 40]], [[0, 0, 40, 40]], [[50, 50, 90, 90]]]
    term = _grounding()
    rewards = term(completions, group=[0, 0, 0], zoom_boxes=zooms, answer=["liver"] * 3, answer_type=["open"] * 3)
    assert term._last[0] == [(0, 0, 40, 40)] and rewards == [1.0, 1.0, 0.0]
    assert majority_correct(completions, [0, 0, 0], ["Liver"] * 3, ["open"] * 3) == 1.0
