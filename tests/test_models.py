"""The tiny model is a standard HF directory, verified and rebuilt when corrupt; real checkpoints fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import FAST_MODEL, compose_cfg
from hydra.utils import instantiate
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLForConditionalGeneration

from medvr.models.spec import CorruptCheckpointError, ModelUnavailableError
from medvr.models.tiny import MANIFEST, TinyQwen2VL


def test_tiny_model_loads_with_plain_transformers(tmp_path, cache_dir, tiny):
    spec = instantiate(compose_cfg(FAST_MODEL, tmp_path, cache_dir).model)
    path = spec.check()
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    tok = processor.tokenizer
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    assert text.endswith("<|im_start|>assistant\n") and "<|vision_start|><|image_pad|><|vision_end|>" in text


def test_tiny_tokenizer_reads_the_zoom_tool_texts_in_words_as_it_reads_the_questions(tiny):
    """The tool prompt, the demonstrations' preamble and the observation are in the tokenizer's corpus: a
    zoom trajectory is not padded out with single letters (the tool prompt took 153 tokens for 48 words)."""
    _, processor, prompt = tiny
    tok = processor.tokenizer
    per_word = lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) / len(text.split())
    question = prompt.text("Which shape does the abnormality have?", ["round", "square", "triangle", "cross"])
    assert per_word(question) < 2
    assert per_word(prompt.zoom_system) < 1.3 * per_word(question)
    assert per_word("Let me look closer.") <= 1.5
    assert per_word("Zoomed view.") <= 2


@pytest.mark.slow
def test_corrupt_or_partial_cache_is_detected_and_rebuilt(tmp_path):
    # a barely warm-started variant: this test is about the cache, not the policy
    cheap = ["model.warm_start.steps=2", "model.warm_start.items=16", "model.vision_pretraining.steps=2",
             "model.vision_pretraining.items=8"]
    spec = instantiate(compose_cfg(cheap, tmp_path, tmp_path / "cache").model)
    built = Path(spec.check())
    assert TinyQwen2VL.is_valid(built)
    weights = next(built.glob("*.safetensors"))
    original = weights.read_bytes()
    corrupted = bytearray(original)
    corrupted[-10] ^= 0xFF
    weights.write_bytes(bytes(corrupted))
    assert not TinyQwen2VL.is_valid(built)
    assert spec.check() == str(built) and weights.read_bytes() == original  # rebuilt, deterministically

    # a build interrupted before its manifest is written counts as missing
    (built / MANIFEST).unlink()
    assert not TinyQwen2VL.is_valid(built)
    spec.check()
    assert TinyQwen2VL.is_valid(built) and not list(built.parent.glob(".tiny-build-*"))


def test_unreachable_hub_checkpoint_says_how_to_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = instantiate(compose_cfg(["model=qwen2vl_2b"], tmp_path, tmp_path / "cache").model)
    with pytest.raises(ModelUnavailableError, match=r"Qwen/Qwen2-VL-2B-Instruct.*model.path=DIR"):
        spec.check()


def test_missing_local_path_names_the_key(tmp_path):
    spec = instantiate(compose_cfg(["model=qwen2vl_2b", f"model.path={tmp_path}/nope"], tmp_path, tmp_path / "c").model)
    with pytest.raises(ModelUnavailableError, match=r"model.path=.*nope.*no config.json"):
        spec.check()


def test_a_truncated_weights_file_or_bad_config_is_named_by_check(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "qwen2_vl"}')
    weights = model_dir / "model.safetensors"
    save_file({"w": torch.zeros(64, 64), "b": torch.zeros(64)}, str(weights))
    spec = instantiate(compose_cfg(["model=qwen2vl_2b", f"model.path={model_dir}"], tmp_path, tmp_path / "c").model)
    assert spec.check() == str(model_dir)

    full = weights.read_bytes()
    weights.write_bytes(full[: len(full) // 2])  # an interrupted copy
    half = re.escape(f"{weights} is {len(full) // 2} bytes but its safetensors header describes {len(full)} bytes")
    with pytest.raises(CorruptCheckpointError, match=rf"{half}: the file is truncated; copy the checkpoint again"):
        spec.check()
    weights.write_bytes(full[:5])
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(weights))} \(5 bytes\) has no readable"):
        spec.check()

    weights.write_bytes(full)
    (model_dir / "config.json").write_text('{"model_type": "qwen2_vl",')
    config = re.escape(str(model_dir / "config.json"))
    with pytest.raises(CorruptCheckpointError, match=rf"{config} cannot be read as JSON"):
        spec.check()


def test_auto_attention_takes_flash_attention_only_where_it_runs(monkeypatch):
    import importlib.util

    from medvr.models import spec

    assert spec._auto_attention("eager", torch.bfloat16) == "eager"  # a named choice is kept
    found = {"flash_attn": object()}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: found.get(name))
    for cuda, dtype, expected in [(True, torch.bfloat16, "flash_attention_2"), (True, torch.float16, "flash_attention_2"),
                                  (True, torch.float32, "sdpa"), (False, torch.bfloat16, "sdpa")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert spec._auto_attention("auto", dtype) == expected
    found.clear()  # not installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert spec._auto_attention("auto", torch.bfloat16) == "sdpa"
