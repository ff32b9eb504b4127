"""The exported policy is a standard HF directory whose reload gives the in-memory policy's logits."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from hydra.utils import instantiate
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import TWO_STEPS, compose_cfg
from medvr.data import synthetic
from medvr.module import GRPOModule
from medvr.rollout.encode import encode_prompts
from medvr.tracking.export import export_policy
from medvr.train import run


def _module(overrides: list[str], tmp_path, cache_dir) -> GRPOModule:
    cfg = compose_cfg([*TWO_STEPS, *overrides], tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    return GRPOModule(model=instantiate(cfg.model), **parts)


def _perturb(params) -> None:
    """Move the weights away from the cached build, so a reload cannot pass by reading the base."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@torch.no_grad()
def _logits(model, processor, prompt) -> torch.Tensor:
    record = synthetic.generate(1, seed=3, split="test")[0].record
    inputs = encode_prompts(processor, prompt, [record], repeat=1)
    inputs.pop("images_per_row")
    return model.eval()(**inputs, use_cache=False).logits  # [1, L, V]


@pytest.mark.slow
def test_training_exports_final_and_best_and_records_them(tmp_path, cache_dir):
    overrides = [o for o in TWO_STEPS if not o.startswith("validate_before_training")]
    cfg = compose_cfg([*overrides, "validate_before_training=true"], tmp_path, cache_dir)
    run(cfg)

    hf = tmp_path / "run" / "hf"
    assert sorted(p.name for p in hf.iterdir()) == ["best", "final"]  # no temp or old directories left
    final = AutoModelForImageTextToText.from_pretrained(hf / "final")
    best = AutoModelForImageTextToText.from_pretrained(hf / "best")
    AutoProcessor.from_pretrained(hf / "final")
    generation = json.loads((hf / "final" / "generation_config.json").read_text())
    assert "output_logits" not in generation and "temperature" not in generation
    # the only in-fit validation is the last step's, so best and final hold the same weights
    best_weights = best.state_dict()
    assert all(torch.equal(v, best_weights[k]) for k, v in final.state_dict().items())

    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    tags = found.data.tags
    assert tags["hf_final"] == str((hf / "final").resolve()) and tags["hf_best"] == str((hf / "best").resolve())
    assert tags["hf_best_step"] == "2"  # the validation before training is not a candidate
    assert float(tags["hf_best_score"]) == found.data.metrics["val/acc"]


@pytest.mark.slow
def test_reloaded_full_model_gives_identical_logits(tmp_path, cache_dir):
    module = _module([], tmp_path, cache_dir)
    _perturb(module.policy.parameters())
    paths = export_policy(module.policy, module.processor, tmp_path / "hf" / "best", merge_lora=True)
    assert list(paths) == ["model"]  # nothing to merge in a full fine-tune

    reloaded = AutoModelForImageTextToText.from_pretrained(paths["model"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(paths["model"])
    expected = _logits(module.policy, module.processor, module.prompt)
    assert torch.equal(_logits(reloaded, processor, module.prompt), expected)


@pytest.mark.slow
def test_lora_adapter_and_merged_copy_reload(tmp_path, cache_dir):
    from peft import PeftModel

    module = _module(["model=tiny_lora"], tmp_path, cache_dir)
    lora = [p for n, p in module.policy.named_parameters() if "lora_" in n]
    _perturb(lora)  # lora_B starts at zero: without this the adapters would change nothing
    before = {n: p.clone() for n, p in module.policy.named_parameters()}
    paths = export_policy(module.policy, module.processor, tmp_path / "hf" / "final", merge_lora=True)
    assert (paths["model"] / "adapter_config.json").is_file() and (paths["model"] / "processor_config.json").is_file()
    assert paths["merged"] == (tmp_path / "hf" / "final-merged").resolve()
    # the training model is untouched: still a PeftModel with its adapters, same weights
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())

    expected = _logits(module.policy, module.processor, module.prompt)
    base = AutoModelForImageTextToText.from_pretrained(module.spec.check(), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, paths["model"])
    assert torch.equal(_logits(adapted, module.processor, module.prompt), expected)

    merged = AutoModelForImageTextToText.from_pretrained(paths["merged"], dtype=torch.float32)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(paths["merged"])
    assert torch.allclose(_logits(merged, processor, module.prompt), expected, atol=1e-5)
