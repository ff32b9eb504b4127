"""experiments/probe_policy.py: greedy and sampled accuracy of a starting policy, per question type."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from conftest import compose_cfg
from hydra.utils import instantiate

from medvr.data import synthetic

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
