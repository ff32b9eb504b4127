"""How well does a starting policy read, greedy and sampled, per question type? (What GRPO starts from.)

    python experiments/probe_policy.py [model=... data=... explore=...] [--items 240] [--samples 8]
    python experiments/probe_policy.py explore=evr      # also: how many zooms are invalid, box IoU with the lesion

GRPO learns from the spread of a group's sampled answers, not from the greedy one: a policy that is
right when greedy but at chance when sampled gives it nothing to amplify. This prints, per question
type (or modality when the data has no types), the greedy accuracy, the sampled accuracy at the
algo's temperature with `--samples` per item, and the share of the most common answer, as a
Markdown table. Everything is read from the same config train.py composes.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

import medvr  # noqa: F401  (registers the config resolvers)
from medvr.rewards.answer import chosen_letter
from medvr.rewards.consensus import iou

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _kind(record: dict) -> str:
    return record.get("question_type") or record.get("modality") or "all"


def probe(model, processor, prompt, explore, records: list[dict], samples: int, temperature: float, batch: int = 24) -> dict:
    """{kind: {"n", "greedy", "sampled", "top_share", "zooms", "invalid", "box_iou"}} plus an "all" row.

    Accuracies are fractions. Zoom columns (from the sampled answers; NaN where there are none): zooms per
    answer, the share of zooms that were invalid actions, and the mean IoU of the valid boxes with the
    item's annotated box (`bbox`, where the data has one).
    """
    greedy, sampled = collections.defaultdict(list), collections.defaultdict(list)
    answers = collections.defaultdict(collections.Counter)
    zooms, invalid, ious = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        ro = explore.rollout(model, processor, prompt, chunk, group_size=1, temperature=temperature, greedy=True)
        for record, completion in zip(chunk, ro.completions):
            letter = chosen_letter(completion)
            for key in (_kind(record), "all"):
                greedy[key].append(letter == record["answer"])
                answers[key][letter] += 1
        if samples:
            ro = explore.rollout(model, processor, prompt, chunk, group_size=samples, temperature=temperature)
            actions = ro.extras.get("zooms", [[] for _ in ro.completions])
            for i, (completion, row_zooms) in enumerate(zip(ro.completions, actions)):
                record = chunk[i // samples]
                for key in (_kind(record), "all"):
                    sampled[key].append(chosen_letter(completion) == record["answer"])
                    zooms[key] += len(row_zooms)
                    invalid[key] += sum(z.error is not None for z in row_zooms)
                    if record.get("bbox"):
                        ious[key] += [iou(z.box, record["bbox"]) for z in row_zooms if z.error is None]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {
        key: {"n": len(greedy[key]), "greedy": mean(greedy[key]), "sampled": mean(sampled[key]),
              "top_share": max(answers[key].values()) / len(greedy[key]),
              "zooms": zooms[key] / len(sampled[key]) if sampled[key] else float("nan"),
              "invalid": invalid[key] / zooms[key] if zooms[key] else float("nan"), "box_iou": mean(ious[key])}
        for key in sorted(greedy, key=lambda k: (k == "all", k))
    }


def markdown(rows: dict) -> str:
    """The table; zoom columns only where some sampled answer zoomed."""
    zoomed = any(r.get("zooms", 0) > 0 for r in rows.values())
    head = "| type | n | greedy acc | sampled acc | top answer share |"
    lines = [head + (" zooms / answer | invalid zooms | box IoU |" if zoomed else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if zoomed else "")]
    for key, r in rows.items():
        line = f"| {key} | {r['n']} | {r['greedy']:.3f} | {r['sampled']:.3f} | {r['top_share']:.2f} |"
        if zoomed:
            line += f" {r['zooms']:.2f} | {r['invalid']:.2f} | {r['box_iou']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--items", type=int, default=240, help="first N items of the split")
    parser.add_argument("--samples", type=int, default=8, help="sampled completions per item (0: greedy only)")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    if f"n_{args.split}" in cfg.data.source:  # generated data: generate as many items as asked
        with open_dict(cfg):
            cfg.data.source[f"n_{args.split}"] = args.items
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data)
    split = data._split(args.split)  # read and checked before the model loads
    model, processor = instantiate(cfg.model).load()
    records = [split[i] for i in range(min(args.items, len(split)))]
    rows = probe(model.eval(), processor, instantiate(cfg.prompt), instantiate(cfg.explore), records,
                 args.samples, instantiate(cfg.algo).temperature)
    print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
