"""Consensus-based Credit Assignment (MedVR, arXiv 2604.08203): grounding rewards without box labels.

Per group of rollouts of one prompt: the successful rollouts (answer == key, or == the group's
majority answer with `label_free`) vote with their zoom boxes; the fused consensus region (when
at least `min_agree` of them zoomed) is the pseudo-label, and each rollout's grounding reward is
the IoU of its zoom box(es) with it. `source="gt"` uses the dataset's box instead: the paper's
"with annotation" control; a row without the question's box (`bbox`) but with named boxes (SLAKE's
organs, `boxes`) is scored against the best-matching of them. Answers of closed and open questions
are compared as normalised text. Rewards follow the TRL contract; None = no target in this group.
Boxes are [x1, y1, x2, y2] pixels of the original image, x2/y2 exclusive.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from medvr.rewards.answer import chosen_answer, key_answer

Box = Sequence[float]
FUSIONS = ("medoid", "weighted_median")
AGGREGATES = ("max", "mean")


def iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 for disjoint or degenerate (zero-area) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer; ties go to the alphabetically first (deterministic, order-free)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return min(a for a, c in counts.items() if c == top)


def _weighted_median(values: list[float], weights: list[float]) -> float:
    pairs = sorted(zip(values, weights))
    half, acc = sum(weights) / 2, 0.0
    for value, weight in pairs:
        acc += weight
        if acc >= half:
            return value
    return pairs[-1][0]


def fuse(boxes: Sequence[Box], method: str = "medoid") -> tuple[float, ...]:
    """One region from many boxes: the medoid (max summed IoU to the others; first on ties), or the
    coordinate-wise median weighted by each box's mean IoU to the others (outliers weigh little)."""
    if not boxes:
        raise ValueError("fuse needs at least one box")
    agreement = [sum(iou(b, o) for j, o in enumerate(boxes) if j != i) for i, b in enumerate(boxes)]
    if method == "medoid":
        return tuple(boxes[max(range(len(boxes)), key=lambda i: (agreement[i], -i))])
    if method == "weighted_median":
        weights = [a + 1e-6 for a in agreement]  # all-disjoint boxes: plain median
        return tuple(_weighted_median([b[k] for b in boxes], weights) for k in range(4))
    raise ValueError(f"reward fusion={method!r}: choose one of {FUSIONS}")


def truth_boxes(bbox: Box | None, boxes: Sequence[dict] | None) -> list[Box]:
    """Ground-truth candidates of a row: the question's box, else every named box (best match wins)."""
    if bbox:
        return [bbox]
    return [b["bbox"] for b in boxes or [] if b.get("bbox")]


def best_iou(box: Box, candidates: Sequence[Box]) -> float:
    return max((iou(box, c) for c in candidates), default=0.0)


def _answers(completions, answer_type, rows=None) -> list[str | None]:
    rows = range(len(completions)) if rows is None else rows
    return [chosen_answer(completions[i], None if answer_type is None else answer_type[i]) for i in rows]


def _groups(group: Sequence[int]) -> dict[int, list[int]]:
    rows = defaultdict(list)
    for i, g in enumerate(group):
        rows[g].append(i)
    return rows


class ConsensusGrounding:
    """Grounding reward: IoU of a rollout's zoom box(es) with its group's consensus (or true) box."""

    def __init__(self, source: str, label_free: bool, min_agree: int, fusion: str, aggregate: str):
        if source not in ("consensus", "gt"):
            raise ValueError(f"reward grounding source={source!r}: choose consensus or gt")
        if fusion not in FUSIONS or aggregate not in AGGREGATES:
            raise ValueError(f"reward grounding: fusion in {FUSIONS}, aggregate in {AGGREGATES}")
        if min_agree < 1:
            raise ValueError(f"reward grounding min_agree={min_agree} must be >= 1")
        self.source = source
        self.label_free = label_free
        self.min_agree = min_agree
        self.fusion = fusion
        self.aggregate = aggregate
        self.__name__ = "grounding"
        self._last: dict[int, tuple[float, ...] | None] = {}  # group -> target region of the last call

    def check_data(self, splits, where: str) -> None:
        """`source="gt"` needs a box on every training row: say which row lacks one, before training."""
        if self.source != "gt":
            return
        rows = splits["train"]
        named = rows["boxes"] if "boxes" in rows.column_names else [None] * len(rows)
        for i, (rid, box, boxes) in enumerate(zip(rows["id"], rows["bbox"], named)):
            if not truth_boxes(box, boxes):
                raise ValueError(
                    f"reward=grounding_gt needs a bounding box (bbox or named boxes) on every training row, but "
                    f"{where}/train row {i} (id {rid!r}) has none; use reward=cca (consensus boxes, no annotation) "
                    "for this dataset."
                )

    def targets(
        self, completions, group, zoom_boxes, answer=None, bbox=None, boxes=None, answer_type=None
    ) -> dict[int, list[Box] | None]:
        """Target regions per group: the consensus of the successful rollouts' boxes, or the true box(es)."""
        out = {}
        for g, rows in _groups(group).items():
            if self.source == "gt":
                out[g] = truth_boxes(bbox[rows[0]], None if boxes is None else boxes[rows[0]]) or None
                continue
            answers = _answers(completions, answer_type, rows)
            kind = None if answer_type is None else answer_type[rows[0]]
            ref = majority_vote(answers) if self.label_free else key_answer(answer[rows[0]], kind)
            voters = [i for i, a in zip(rows, answers) if ref is not None and a == ref and zoom_boxes[i]]
            enough = len(voters) >= self.min_agree
            out[g] = [fuse([b for i in voters for b in zoom_boxes[i]], self.fusion)] if enough else None
        return out

    def __call__(
        self, completions: list[str], group, zoom_boxes, answer=None, bbox=None, boxes=None, answer_type=None, **_
    ) -> list[float | None]:
        answer = None if self.label_free else answer
        self._last = self.targets(completions, group, zoom_boxes, answer, bbox, boxes, answer_type)
        rewards: list[float | None] = []
        for i, g in enumerate(group):
            target = self._last[g]
            if target is None:
                rewards.append(None)
            elif not zoom_boxes[i]:
                rewards.append(0.0)  # did not ground although the group agreed on a region
            else:
                scores = [best_iou(b, target) for b in zoom_boxes[i]]
                rewards.append(max(scores) if self.aggregate == "max" else sum(scores) / len(scores))
        return rewards

    def stats(
        self, rewards, completions=None, group=None, answer=None, bbox=None, boxes=None, answer_type=None, **_
    ) -> dict[str, float]:
        """train/cca/* monitors of the last call; they read the labels, the reward itself never does."""
        targets = self._last
        if not targets:
            return {}
        out = {"cca/consensus_rate": sum(t is not None for t in targets.values()) / len(targets)}
        if self.label_free and answer is not None:
            out["cca/majority_correct"] = majority_correct(completions, group, answer, answer_type)
        known = [r for r in rewards if r is not None]
        if known:
            out["cca/iou_to_consensus"] = sum(known) / len(known)
        if self.source == "consensus" and bbox is not None and group is not None:
            first = {g: rows[0] for g, rows in _groups(group).items()}
            truth = {g: truth_boxes(bbox[i], None if boxes is None else boxes[i]) for g, i in first.items()}
            ious = [best_iou(t[0], truth[g]) for g, t in targets.items() if t is not None and truth[g]]
            if ious:
                out["cca/consensus_iou_to_gt"] = sum(ious) / len(ious)
        return out


class ConsensusAnswer:
    """Label-free accuracy (TTRL-style): 1 when a rollout's answer is its group's majority answer."""

    def __init__(self) -> None:
        self.__name__ = "consensus_answer"

    def __call__(self, completions: list[str], group, answer_type=None, **_) -> list[float | None]:
        answers = _answers(completions, answer_type)
        majority = {g: majority_vote([answers[i] for i in rows]) for g, rows in _groups(group).items()}
        return [float(majority[g] is not None and a == majority[g]) for a, g in zip(answers, group)]

    def stats(self, rewards, completions=None, group=None, answer=None, answer_type=None, **_) -> dict[str, float]:
        if completions is None or group is None or answer is None:
            return {}
        return {"cca/majority_correct": majority_correct(completions, group, answer, answer_type)}


def majority_correct(completions: list[str], group, answer, answer_type=None) -> float:
    """Share of groups whose majority answer is the key: how good label-free pseudo-labels are."""
    answers = _answers(completions, answer_type)
    rows = _groups(group)
    kinds = [None] * len(completions) if answer_type is None else answer_type
    hits = [majority_vote([answers[i] for i in r]) == key_answer(answer[r[0]], kinds[r[0]]) for r in rows.values()]
    return sum(hits) / len(hits)
