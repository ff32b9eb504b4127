"""`run(cfg)`: evaluate a checkpoint on one or more VQA sets without training it (eval.py calls it).

The checkpoint is `model=` (a hub id or `model.path=DIR`) or a trained run (`run=<run dir or MLflow
run id>`, whose HF export it loads). Every set is read and validated before the model loads. Each
answer is decoded greedily and scored as medvr/scoring.py says (MedVLM-R1's letter extraction for
choice questions). One MLflow run holds `eval/<set>/...` metrics, the table (Markdown, CSV) and
every prediction; each set is marked in- or out-of-distribution for the checkpoint's training data.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from medvr.models.spec import ModelSpec
from medvr.scoring import COLUMNS, Tally, metrics, score
from medvr.tracking.run import artifact_location, note_experiment, record_failure, resolved, store_lock

log = logging.getLogger(__name__)
# sources drawn from the same release as another: a checkpoint trained on one has seen the other's domain
FAMILY = {"medvlm_r1_test": "omnimedvqa"}
_PROGRESS_SECONDS = 30.0


class EvalInputError(ValueError):
    """`run=` or the checkpoint it names cannot be used."""


@dataclass
class Checkpoint:
    spec: ModelSpec  # what to load
    adapter: Path | None  # a LoRA adapter directory to put on the loaded base, or None
    trained_on: DictConfig | None  # the `data` config it was trained with, when known
    label: str  # how the run and the table name it


def _run_config(cfg: DictConfig) -> tuple[Path, DictConfig, str]:
    """(HF export directory, the training run's config, label) for `run=<run dir or MLflow run id>`."""
    which = cfg.checkpoint
    local = Path(str(cfg.run)).expanduser()
    if local.is_dir():
        config = local / ".hydra" / "config.yaml"
        if not config.is_file():
            raise EvalInputError(f"run={cfg.run}: {config} does not exist; give a training run's directory "
                                 "(outputs/runs/<date>/<time>) or its MLflow run id")
        export = local / "hf" / which
        trained = OmegaConf.load(config)
        label = str(local)
    else:
        client = MlflowClient(cfg.logger.tracking_uri)
        try:
            found = client.get_run(str(cfg.run))
        except Exception as err:
            raise EvalInputError(f"run={cfg.run} is neither a directory nor a run id in {cfg.logger.tracking_uri} "
                                 f"({type(err).__name__})") from err
        tag = found.data.tags.get(f"hf_{which}_merged") or found.data.tags.get(f"hf_{which}")
        if tag is None:
            raise EvalInputError(f"MLflow run {cfg.run} has no tag hf_{which}: it exported no '{which}' policy "
                                 "(callbacks.export_hf was off, or the run did not finish); try checkpoint=final")
        export = Path(tag)
        trained = OmegaConf.load(client.download_artifacts(str(cfg.run), "config.yaml"))
        label = f"{found.info.run_name} ({cfg.run})"
    if not export.is_dir():
        raise EvalInputError(f"run={cfg.run}: the '{which}' export {export} does not exist (checkpoint={which}); "
                             "runs export hf/final when training ends and hf/best at each better validation")
    return export, trained, label


def locate(cfg: DictConfig) -> Checkpoint:
    """What to evaluate: `model=` as configured, or the HF export of `run=`."""
    if cfg.run is None:
        spec = instantiate(cfg.model)
        trained = _training_config_near(Path(spec.path)) if getattr(spec, "path", None) else None
        return Checkpoint(spec, None, trained, spec.path or spec.hub_id or spec.name)
    export, trained, label = _run_config(cfg)
    if (export / "adapter_config.json").is_file():  # LoRA: the run's own base, then its adapters
        with open_dict(trained):
            trained.model.lora = None
            trained.model.quantization = None  # evaluated in the base's full precision
        return Checkpoint(instantiate(trained.model), export, trained.get("data"), label)
    model = OmegaConf.to_container(trained.model, resolve=True)
    keep = ("name", "dtype", "attn_implementation", "min_pixels", "max_pixels", "box_scale", "image_factor")
    spec = ModelSpec(**{k: model.get(k) for k in keep}, hub_id=None, path=str(export), freeze_vision=False,
                     gradient_checkpointing=False)
    return Checkpoint(spec, None, trained.get("data"), label)


def _training_config_near(path: Path) -> DictConfig | None:
    """The `data` config of the run that exported `path` (<run dir>/hf/<name>), when it is one."""
    config = path.parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(config).get("data") if config.is_file() else None


def distribution(source, modality: str, trained_on: DictConfig | None) -> str:
    """in | out | unknown: is (dataset, modality) part of the checkpoint's training data?"""
    target = OmegaConf.select(trained_on, "source._target_", default=None) if trained_on is not None else None
    trained = getattr(get_class(target), "name", None) if target else None
    if not isinstance(trained, str):  # no training data on record, or a source without a fixed name (data=hf)
        return "unknown"
    if FAMILY.get(source.name, source.name) != FAMILY.get(trained, trained):
        return "out"
    sizes = OmegaConf.select(trained_on, "source.sizes.train", default=None)
    modalities = OmegaConf.select(trained_on, "source.modalities", default=None)
    seen = list(sizes) if OmegaConf.is_dict(sizes) else (list(modalities) if modalities is not None else None)
    return "in" if seen is None or modality in seen else "out"


def _sets(cfg: DictConfig) -> dict[str, tuple[object, str]]:
    """name -> (datamodule, split): the `data` group's set plus every `sets=[...]` one, all validated."""
    found = {}
    configs = ([(None, cfg.data)] if cfg.get("data") is not None else []) + list((cfg.get("sets") or {}).items())
    if not configs:
        raise EvalInputError("nothing to evaluate: choose data=<dataset> and/or sets=[<dataset>,...]")
    for name, data in configs:
        split = data.get("split", cfg.split) if name is not None else cfg.split
        with open_dict(data):
            data.pop("split", None)
        datamodule = instantiate(data)
        datamodule.setup("test")  # reads and checks every row before any model loads
        name = name or datamodule.source.name
        if split not in ("val", "test") or split not in datamodule.splits:
            raise EvalInputError(f"set '{name}' has no split '{split}' (it has {sorted(datamodule.splits)}); "
                                 f"set split=val or split=test (or sets.{name}.split=...)")
        found[name] = (datamodule, split)
    return found


def _load(checkpoint: Checkpoint, device: torch.device):
    checkpoint.spec.check()
    policy, processor = checkpoint.spec.load()
    if checkpoint.adapter is not None:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(policy, str(checkpoint.adapter))
    return policy.to(device).eval(), processor


def _open_run(cfg: DictConfig, checkpoint: Checkpoint, names: list[str]):
    tags = {"medvr_eval": "true", "checkpoint": checkpoint.label, "sets": ",".join(names)}
    if cfg.run is not None:
        tags["evaluated_run"] = str(cfg.run)
    name = cfg.logger.run_name or f"eval-{checkpoint.spec.name}-{'+'.join(names)}"
    with store_lock(cfg.logger.tracking_uri):
        logger = instantiate(cfg.logger, run_name=name, tags=tags, artifact_location=artifact_location(cfg))
        note_experiment(logger.experiment, logger.experiment_id, logger.description)
    return logger


def _evaluate_set(name: str, datamodule, split: str, policy, processor, prompt, explore) -> tuple[Tally, list[dict]]:
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    tally, rows, total = Tally(), [], len(loader.dataset)
    started = last = time.monotonic()
    for batch in loader:
        with torch.no_grad():
            rollouts = explore.rollout(policy, processor, prompt, batch, group_size=1, temperature=1.0, greedy=True)
        for record, completion in zip(batch, rollouts.completions):
            scored = score(record, completion)
            tally.add(record, scored)
            rows.append({"id": record["id"], "modality": record["modality"], "question_type": record["question_type"],
                         "answer_type": record["answer_type"], "key": record["answer"], "answer": scored.answer,
                         "correct": int(scored.correct), "formatted": int(scored.formatted), "completion": completion})
        if time.monotonic() - last > _PROGRESS_SECONDS or len(rows) == total:
            last = time.monotonic()
            done = sum(r["correct"] for r in rows)
            print(f"eval {name}/{split}: {len(rows)}/{total} items, acc {done / len(rows):.3f}, "
                  f"{last - started:.0f} s", flush=True)
    return tally, rows


def table_rows(name: str, split: str, tally: Tally, source, trained_on) -> list[dict]:
    """One row for the whole set, then one per modality, with its distribution label."""
    names, sums = tally.table()
    labels = {g: distribution(source, g.partition("/")[2], trained_on) for g in names if g.startswith("modality/")}
    kinds = set(labels.values())
    labels["all"] = kinds.pop() if len(kinds) == 1 else "mixed"
    out = []
    for group, row in zip(names, sums.tolist()):
        if group not in labels:  # question-type and answer-type groups are metrics, not table rows
            continue
        values = dict(zip(COLUMNS, row))
        out.append({
            "set": name, "split": split, "modality": group.partition("/")[2] or "all", "n": int(values["n"]),
            "acc": values["correct"] / values["n"], "format": values["format"] / values["n"],
            "f1": values["f1"] / values["n_open"] if values["n_open"] else None,
            "recall": values["recall"] / values["n_open"] if values["n_open"] else None,
            "distribution": labels[group],
        })
    return out


def markdown(rows: list[dict]) -> str:
    header = ["set", "split", "modality", "n", "acc", "format", "f1", "recall", "distribution"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else ("" if row[k] is None else str(row[k]))
                 for k in header]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the checkpoint on every set; return the logged metrics."""
    torch.manual_seed(cfg.seed)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    logger = None
    try:
        checkpoint = locate(cfg)
        sets = _sets(cfg)
        logger = _open_run(cfg, checkpoint, list(sets))
        client = logger.experiment
        client.log_text(logger.run_id, OmegaConf.to_yaml(resolved(cfg)), "config.yaml")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        policy, processor = _load(checkpoint, device)
        prompt, explore = instantiate(cfg.prompt), instantiate(cfg.explore)
        results, table, started = {}, [], time.monotonic()
        for name, (datamodule, split) in sets.items():
            tally, rows = _evaluate_set(name, datamodule, split, policy, processor, prompt, explore)
            results |= metrics(*tally.table(), f"eval/{name}")
            table += table_rows(name, split, tally, datamodule.source, checkpoint.trained_on)
            client.log_text(logger.run_id, _csv(rows), f"predictions/{name}.csv")
        seconds = time.monotonic() - started
        results["eval/seconds_per_100_items"] = 100 * seconds / max(1, sum(r["n"] for r in table if r["modality"] == "all"))
        logger.log_metrics(results, step=0)
        for row in (r for r in table if r["modality"] == "all"):
            client.set_tag(logger.run_id, f"distribution/{row['set']}", row["distribution"])
        client.log_text(logger.run_id, markdown(table), "eval_table.md")
        client.log_text(logger.run_id, _csv(table), "eval_table.csv")
        print(markdown(table), flush=True)
        logger.end("FINISHED")
        return results
    except KeyboardInterrupt:
        if logger is not None:
            logger.end("KILLED")
        raise SystemExit(130) from None
    except BaseException as exc:
        if logger is not None:
            record_failure(logger, exc)
        raise
    finally:
        if env_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
        sys.stdout.flush()
