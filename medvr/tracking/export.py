"""The trained policy as a standard Hugging Face directory, at the end of training and at the best validation.

Lightning checkpoints need medvr to be read; these directories need only `from_pretrained`
(transformers, peft, TRL, `eval.py`). A full fine-tune gives `save_pretrained` of the model and the
processor; LoRA gives the peft adapter directory (plus the processor) and, with `merge_lora`, a
`<dir>-merged` copy with the adapters folded into the base weights. Every write is atomic: a reader
sees the previous export or the new one, never a half-written directory.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

# sampling flags that GenerationConfig refuses to save (or warns about on load) when do_sample is off
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# per-call output switches: a model loaded with them would change what plain `generate` returns
_RUNTIME_FLAGS = ("output_logits", "output_scores", "output_attentions", "output_hidden_states", "return_dict_in_generate")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def plain_generation_config(config):
    """A copy of `config` that saves and loads cleanly: no runtime output switches, no sampling
    flags unless `do_sample` is on (a hub config like Qwen2-VL's keeps its own decoding defaults)."""
    config = copy.deepcopy(config)
    for key in _RUNTIME_FLAGS:
        setattr(config, key, None)
    if not config.do_sample:
        for key in _SAMPLING_FLAGS:
            setattr(config, key, None)
    return config


def _save_pretrained(model, processor, directory: Path) -> None:
    """`save_pretrained` of model and processor, the model's generation config cleaned for the copy only."""
    generation = getattr(model, "generation_config", None)
    if generation is not None and not _is_peft(model):
        model.generation_config = plain_generation_config(generation)
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if generation is not None and not _is_peft(model):
            model.generation_config = generation
    processor.save_pretrained(directory)


def _atomic_write(target: Path, write) -> Path:
    """Run `write(tmp)` on a fresh directory next to `target`, then swap it into place (old one removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)  # rename(2) cannot replace a non-empty directory: move it aside first
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target.resolve()


def export_policy(policy, processor, target: str | Path, merge_lora: bool = False) -> dict[str, Path]:
    """Save `policy` + `processor` under `target`; return {"model": dir} (+ {"merged": dir} for merged LoRA).

    The training model is never modified: a merged copy is made from a deep copy of the policy,
    which needs memory for a second copy of the model for as long as it is being written.
    """
    target = Path(target)
    paths = {"model": _atomic_write(target, lambda d: _save_pretrained(policy, processor, d))}
    if merge_lora and _is_peft(policy):
        if getattr(policy.get_base_model(), "hf_quantizer", None) is not None:
            raise ValueError(
                "callbacks.export_hf.merge_lora=true with a quantized (QLoRA) base: adapters cannot be merged "
                "into 4-bit weights exactly. Set callbacks.export_hf.merge_lora=false and load the adapter "
                "directory with peft, or merge it into a full-precision copy of the base model offline."
            )
        merged = copy.deepcopy(policy).merge_and_unload()
        try:
            paths["merged"] = _atomic_write(
                target.with_name(f"{target.name}-merged"), lambda d: _save_pretrained(merged, processor, d)
            )
        finally:
            del merged
    return paths


class ExportHF(L.Callback):
    """`<dirpath>/final` when training ends and `<dirpath>/best` whenever the in-fit `monitor` improves;
    the paths go to the MLflow run as tags `hf_final`, `hf_best` (and `*_merged`, `hf_best_score`, `hf_best_step`)."""

    def __init__(self, dirpath: str, monitor: str, mode: str, merge_lora: bool):
        if mode not in ("max", "min"):
            raise ValueError(f"callbacks.export_hf.mode={mode!r}: use 'max' or 'min'.")
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.mode = mode
        self.merge_lora = merge_lora
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._warned_missing = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        spec = getattr(pl_module, "spec", None)
        if self.merge_lora and spec is not None:
            if not spec.uses_lora:
                log.warning("callbacks.export_hf.merge_lora=true has no effect: model=%s trains no LoRA adapters", spec.name)
            elif spec.quantization is not None:  # fail before training, not after it
                raise ValueError(
                    f"callbacks.export_hf.merge_lora=true with model.quantization={spec.quantization!r}: a merged "
                    "copy of a QLoRA model is not supported. Set callbacks.export_hf.merge_lora=false (the adapter "
                    "directory is still exported)."
                )

    def _improved(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_end(self, trainer, pl_module) -> None:
        # only validations inside fit: not the sanity check, not trainer.validate() before training
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing:
                log.warning("callbacks.export_hf.monitor=%r was not logged by validation: no best export", self.monitor)
                self._warned_missing = True
            return
        score = float(value)
        if not self._improved(score):
            return
        self.best_score, self.best_step = score, trainer.global_step
        self._export(trainer, pl_module, "best")
        self._tag(trainer, {"hf_best_score": f"{score:g}", "hf_best_step": str(self.best_step)})

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, "final")

    def _export(self, trainer, pl_module, name: str) -> None:
        if trainer.is_global_zero:
            paths = export_policy(pl_module.policy, pl_module.processor, self.dirpath / name, self.merge_lora)
            self._tag(trainer, {f"hf_{name}" + ("" if k == "model" else f"_{k}"): str(p) for k, p in paths.items()})
            log.info("step %d: %s policy exported to %s", trainer.global_step, name, paths["model"])
        trainer.strategy.barrier("export_hf")

    @staticmethod
    def _tag(trainer, tags: dict[str, str]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                for key, value in tags.items():
                    logger.experiment.set_tag(logger.run_id, key, value)

    # the best score survives a resume from last.ckpt, so a worse validation does not overwrite `best`
    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")
