"""experiments/probe_policy.py: greedy and sampled accuracy of a starting policy, per question type."""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from medvr.data import synthetic
from medvr.explore.trajectory import Zoom

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from probe_policy import markdown, probe


def test_probe_policy_reports_greedy_and_sampled_accuracy_per_type(tiny, tmp_path):
    model, processor, prompt = tiny
    explore = instantiate(compose_cfg([], tmp_path, tmp_path / "cache").explore)
    records = [it.record for it in synthetic.generate(12, seed=0, split="test")]
    torch.manual_seed(0)
    rows = probe(model, processor, prompt, explore, records, samples=2, temperature=1.0, batch=6)
    kinds = collections.Counter(r["question_type"] for r in records)
    assert list(rows)[-1] == "all" and rows["all"]["n"] == 12
    assert {k: rows[k]["n"] for k in kinds} == dict(kinds)
    for row in rows.values():
        for key in ("greedy", "sampled", "top_share"):
            assert 0.0 <= row[key] <= 1.0
    # the "all" row is the item-weighted mean of the per-type rows
    total = sum(rows[k]["greedy"] * rows[k]["n"] for k in kinds) / 12
    assert abs(rows["all"]["greedy"] - total) < 1e-9
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| all | 12 |" in table
    assert "zooms" not in table  # explore=none: no zoom columns


def test_probe_reports_how_many_zooms_are_invalid_and_where_the_valid_ones_look(tiny, tmp_path):
    model, processor, prompt = tiny
    explore = instantiate(compose_cfg(["explore=tool"], tmp_path, tmp_path / "cache").explore)
    records = [it.record for it in synthetic.generate(12, seed=0, split="test")]
    torch.manual_seed(0)
    rows = probe(model, processor, prompt, explore, records, samples=4, temperature=1.0, batch=6)
    everything = rows.pop("all")
    assert everything["zooms"] > 0  # the warm start demonstrates the tool: some sampled answers zoom
    assert 0.0 <= everything["invalid"] <= 1.0
    # the "all" row's zooms per answer is the answer-weighted mean over the types
    total = sum(r["zooms"] * r["n"] for r in rows.values()) / everything["n"]
    assert abs(everything["zooms"] - total) < 1e-9
    table = markdown({**rows, "all": everything})
    assert "| zooms / answer | invalid zooms | box IoU |" in table.splitlines()[0]
    assert f"| {everything['zooms']:.2f} | {everything['invalid']:.2f} | {everything['box_iou']:.3f} |" in table


class _Zooms:
    """An explore whose every answer is right and holds one zoom onto the item's box and one invalid zoom."""

    def rollout(self, model, processor, prompt, records, *, group_size, temperature, greedy=False):
        rows = [r for r in records for _ in range(group_size)]
        zooms = [[Zoom("", (0, 0), False, box=tuple(r["bbox"])), Zoom("", (0, 0), False, error="unparsable")] for r in rows]
        half = [[Zoom("", (0, 0), False, box=(r["bbox"][0], r["bbox"][1], r["bbox"][2], (r["bbox"][1] + r["bbox"][3]) / 2))]
                for r in rows]
        return SimpleNamespace(completions=[f"<answer>{r['answer']}</answer>" for r in rows],
                               extras={"zooms": half if greedy else zooms})


def test_probe_zoom_columns_count_invalid_actions_and_score_boxes_against_the_annotation():
    records = [it.record for it in synthetic.generate(6, seed=0, split="test")]
    rows = probe(None, None, None, _Zooms(), records, samples=3, temperature=1.0, batch=4)
    assert rows["all"]["sampled"] == 1.0 and rows["all"]["greedy"] == 1.0
    # sampled answers only: 2 zooms each, half of them invalid, the valid box is the annotation itself
    assert (rows["all"]["zooms"], rows["all"]["invalid"], rows["all"]["box_iou"]) == (2.0, 0.5, 1.0)
