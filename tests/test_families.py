"""Every Qwen-VL family on a tiny random checkpoint: configs, loading, encoding, sampling, training, zoom boxes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import SMALL_DATA, compose_cfg
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2VLImageProcessor

from medvr.config_checks import ConfigError, check_config
from medvr.data import synthetic
from medvr.explore.engine import MultiTurn
from medvr.explore.zoom import ZoomEnv
from medvr.models.family import FAMILIES, VISION_TOKENS, UnsupportedFamilyError, vision_tower
from medvr.models.tiny_random import TinyRandom, build_tiny_random
from medvr.models.tiny_tokenizer import train_tokenizer
from medvr.rollout import generate
from medvr.rollout.encode import encode_prompts, vision_token_ids
from medvr.rollout.generate import token_logps
from medvr.train import run

# model config of each family, and a pixel budget of 4 to 16 merged tokens
CASES = {
    "qwen2_vl": ("qwen2vl_2b", 3136, 12544),
    "qwen2_5_vl": ("qwen2_5vl_3b", 3136, 12544),
    "qwen3_vl": ("qwen3vl_2b", 4096, 16384),
}
TYPES = list(CASES)


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory) -> dict:
    """{model_type: directory} of a random tiny checkpoint per family, sharing one small tokenizer."""
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(synthetic.corpus_texts(64, seed=0), 1024).save_pretrained(tokenizer_dir)
    return {t: build_tiny_random(t, tmp_path_factory.mktemp(t), tokenizer_dir) for t in TYPES}


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the training tests (a new sqlite store takes seconds to migrate)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _overrides(model_type: str, directory, name: str | None = None) -> list[str]:
    """The family's config (or `name`) pointed at the tiny checkpoint, in fp32 (dtype=auto is bf16 on a GPU
    machine), with a tiny pixel budget."""
    default, lo, hi = CASES[model_type]
    return [f"model={name or default}", f"model.path={directory}", "model.dtype=float32", f"model.min_pixels={lo}",
            f"model.max_pixels={hi}"]


def _load(model_type, tiny_random, tmp_path, *extra, name: str | None = None):
    overrides = [*_overrides(model_type, tiny_random[model_type], name), *extra]
    cfg = compose_cfg(overrides, tmp_path, tmp_path / "cache")
    model, processor = instantiate(cfg.model).load()
    return model.eval(), processor, instantiate(cfg.prompt)


def _records(n: int) -> list[dict]:
    sizes, records = set(), []
    for item in synthetic.generate(32, seed=3, split="test"):
        if item.record["image"].size not in sizes:  # mixed sizes: different grids, left padding
            sizes.add(item.record["image"].size)
            records.append(item.record)
    return records[:n]


# ---- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model_type", "hub_id"),
    [
        ("qwen2vl_2b", "qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
        ("qwen2_5vl_3b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
        ("qwen2_5vl_7b", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ("qwen2_5vl_7b_lora", "qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
        ("qwen3vl_2b", "qwen3_vl", "Qwen/Qwen3-VL-2B-Instruct"),
    ],
)
def test_each_family_config_carries_its_conventions_into_the_zoom_tool(tmp_path, name, model_type, hub_id):
    cfg = compose_cfg([f"model={name}", "explore=tool"], tmp_path, tmp_path / "cache")
    check_config(cfg)
    family = FAMILIES[model_type]
    spec = instantiate(cfg.model)
    assert (spec.name, spec.hub_id) == (name, hub_id)
    assert spec.box_scale == family.box_scale and spec.image_factor == family.image_factor
    # MedVLM-R1's budget: at most 512 merged tokens of the family's size
    assert spec.max_pixels == 512 * family.image_factor**2 and spec.min_pixels == 4 * family.image_factor**2
    env = instantiate(cfg.explore.env)
    assert (env.box_scale, env.image_factor, env.min_side) == (family.box_scale, family.image_factor, family.image_factor)
    system = instantiate(cfg.prompt).zoom_system
    words = "pixel coordinates of the image" if family.box_scale == "resized" else "coordinates from 0 to 1000"
    assert words in system
    assert (spec.lora is not None) == name.endswith("_lora")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.box_scale=pixels"], r"model.box_scale='pixels': expected null or an int >= 1 or resized"),
        (["explore.env.image_factor=null"], r"explore.env.box_scale=resized needs explore.env.image_factor"),
        (["model.image_factor=0"], r"model.image_factor=0: expected an int >= 1"),
    ],
)
def test_config_checks_reject_a_bad_box_convention(tmp_path, overrides, message):
    cfg = compose_cfg(["model=qwen2_5vl_3b", "explore=tool", *overrides], tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


# ---- zoom boxes ---------------------------------------------------------------------------------


def _env(model_type: str, max_pixels: int = 401408) -> ZoomEnv:
    family = FAMILIES[model_type]
    return ZoomEnv(box_scale=family.box_scale, min_side=1, upscale=1.0, min_pixels=4 * family.image_factor**2,
                   max_pixels=max_pixels, observation="", invalid_observation="{error}",
                   image_factor=family.image_factor)


@pytest.mark.parametrize(
    ("model_type", "model_box"),
    [
        ("qwen2_vl", (100, 100, 500, 500)),  # 0..1000 of each side
        # 640x480 is resized to 644x476 (multiples of 28): the box in the resized image's pixels
        ("qwen2_5_vl", (64, 47, 322, 238)),
        ("qwen3_vl", (100, 100, 500, 500)),
    ],
)
def test_each_family_box_convention_maps_a_known_box(model_type, model_box):
    env, pixels = _env(model_type), (64, 48, 320, 240)  # on a 640x480 original
    assert env.from_pixels(pixels, 640, 480) == model_box
    back = env.to_pixels(model_box, 640, 480)
    assert all(abs(a - b) <= 1 for a, b in zip(back, pixels))
    assert env.step(f"<zoom>[{', '.join(map(str, model_box))}]</zoom>", Image.new("RGB", (640, 480))).box == back


@pytest.mark.parametrize("size", [(640, 480), (256, 320), (1000, 130), (90, 60), (2048, 1536)])
def test_resized_frame_is_the_image_the_processor_gives_the_model(size):
    """box_scale=resized counts pixels of exactly the image the vision tower sees (grid x patch size)."""
    env = _env("qwen2_5_vl", max_pixels=200704)
    processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, size={"shortest_edge": env.min_pixels,
                                                                         "longest_edge": env.max_pixels})
    _, rows, cols = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert env.frame(*size) == (cols * 14, rows * 14)
    assert env.to_pixels((0, 0, cols * 14, rows * 14), *size) == (0, 0, *size)  # the whole view is the whole image


# ---- loading and encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_loading_uses_the_family_processor_and_encodes_its_grid(tiny_random, tmp_path, model_type):
    model, processor, prompt = _load(model_type, tiny_random, tmp_path, "model.freeze_vision=true")
    family = FAMILIES[model_type]
    assert model.config.model_type == model_type
    assert type(processor).__name__ == family.processor_class
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == family.image_factor
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {f"model.visual.{n}" for n, _ in vision_tower(model).named_parameters()}
    records = _records(2)
    enc = encode_prompts(processor, prompt, records, repeat=2)
    assert set(enc) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                        "images_per_row"}
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == image_pad)
    merged = enc["image_grid_thw"].prod(-1) // family.merge_size**2  # [I] tokens per image
    assert (enc["input_ids"] == image_pad).sum(-1).tolist() == merged.tolist()  # one image per row
    _, lo, hi = CASES[model_type]
    resized = ZoomEnv(box_scale="resized", min_side=1, upscale=1.0, min_pixels=lo, max_pixels=hi, observation="",
                      invalid_observation="", image_factor=family.image_factor)
    for record, grid in zip(records, enc["image_grid_thw"][::2]):  # the budget of model.min/max_pixels
        assert resized.frame(*record["image"].size) == (grid[2] * family.patch_size, grid[1] * family.patch_size)
    # the processor places the placeholders medvr forbids to the policy
    assert {processor.image_token, processor.video_token} <= set(VISION_TOKENS)
    assert vision_token_ids(processor) == sorted(processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)))


def test_a_config_for_another_family_fails_on_the_image_factor(tiny_random, tmp_path):
    cfg = compose_cfg(["model=qwen3vl_2b", f"model.path={tiny_random['qwen2_5_vl']}"], tmp_path, tmp_path / "c")
    with pytest.raises(ValueError, match=r"model.image_factor=32, but .* multiples of 28 px .* model.image_factor=28"):
        instantiate(cfg.model).load()


def test_a_box_convention_other_than_the_pretrained_one_is_warned(tiny_random, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medvr.models.spec"):
        _load("qwen3_vl", tiny_random, tmp_path, "model.box_scale=resized")
    assert "Qwen/Qwen3-VL-2B-Instruct was pretrained on boxes with box_scale=1000" in caplog.text


def test_an_unsupported_architecture_fails_at_check(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    cfg = compose_cfg(["model=qwen2_5vl_3b", f"model.path={tmp_path}"], tmp_path, tmp_path / "c")
    with pytest.raises(UnsupportedFamilyError, match=r"model_type 'llava'.*qwen2_vl, qwen2_5_vl, qwen3_vl"):
        instantiate(cfg.model).check()


@pytest.mark.parametrize(("option", "model_type"), [("tiny_qwen2_5vl", "qwen2_5_vl"), ("tiny_qwen3vl", "qwen3_vl")])
def test_tiny_random_options_build_once_and_load_their_family(tmp_path, option, model_type):
    cfg = compose_cfg([f"model={option}", "explore=tool"], tmp_path, tmp_path / "cache")
    check_config(cfg)
    spec = instantiate(cfg.model)
    path = spec.check()
    assert TinyRandom.is_valid(Path(path)) and spec.check() == path  # built once, then reused
    model, processor = spec.load()
    family = FAMILIES[model_type]
    assert model.config.model_type == model_type and type(processor).__name__ == family.processor_class
    assert sum(p.numel() for p in model.parameters()) < 500_000
    env = instantiate(cfg.explore.env)
    assert (env.box_scale, env.image_factor) == (family.box_scale, family.image_factor)


def test_lora_config_adapts_the_language_model_only(tiny_random, tmp_path):
    model, _, _ = _load("qwen2_5_vl", tiny_random, tmp_path, name="qwen2_5vl_7b_lora")
    # Qwen2.5-VL's vision MLP has gate/up/down_proj too: the pattern must leave them alone
    assert any(".visual." in n and n.endswith("mlp.gate_proj") for n, _ in model.named_modules())
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted and all(".language_model." in n for n in adapted)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


# ---- sampling and training ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_sampling_log_probs_equal_the_training_forward(tiny_random, tmp_path, model_type):
    model, processor, prompt = _load(model_type, tiny_random, tmp_path)
    torch.manual_seed(0)
    rollouts = MultiTurn(max_new_tokens=16).rollout(model, processor, prompt, _records(2), group_size=2,
                                                    temperature=1.0)
    assert (rollouts.attention_mask[:, 0] == 0).any(), "the batch should be left-padded"
    logps, _ = token_logps(model, rollouts, 1.0, torch.tensor(vision_token_ids(processor)))
    mask = rollouts.loss_mask.bool()
    assert mask.sum() >= 8
    torch.testing.assert_close(logps[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_each_family_runs_a_shared_prompt_once_with_the_same_log_probs(tiny_random, tmp_path, model_type, monkeypatch):
    """The G rows of a prompt on one pass over it (medvr/rollout/generate.py) give the full forward's log-probs."""
    model, processor, prompt = _load(model_type, tiny_random, tmp_path)
    model.gradient_checkpointing_disable()  # which turns the KV cache, and so the shared pass, off
    torch.manual_seed(0)
    rollouts = MultiTurn(max_new_tokens=16).rollout(model, processor, prompt, _records(2), group_size=2,
                                                    temperature=1.0)
    assert generate._shared_prompts(model, rollouts) is not None
    forbidden = torch.tensor(vision_token_ids(processor))
    shared, _ = token_logps(model, rollouts, 1.0, forbidden)
    monkeypatch.setattr(generate, "_shared_prompts", lambda *a: None)
    full, _ = token_logps(model, rollouts, 1.0, forbidden)
    mask = rollouts.loss_mask.bool()
    torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_two_zooming_training_steps_update_every_family(tiny_random, tmp_path, cache_dir, tracking_uri, model_type):
    """random_crop forces a zoom (box written in the family's convention, crop observed as a second image);
    grounding_gt rewards its IoU with the true box, so a random policy still gets advantages that differ."""
    cfg = compose_cfg(
        [
            *_overrides(model_type, tiny_random[model_type]),
            *SMALL_DATA,
            "explore=random_crop", "explore.trigger.rate=1.0", "explore.trigger.min_tokens=1",
            "explore.trigger.span=2", "explore.max_new_tokens=12",
            # crops of 90-100% of each side: every one overlaps the lesion unless the box convention is wrong
            "explore.trigger.min_frac=0.9", "explore.trigger.max_frac=1.0",
            "reward=grounding_gt", "reward.credit=sequence",
            "algo.group_size=2", "data.batch_size=2", "optimizer.lr=1e-2",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "validate_before_training=false", "test_after_training=false", f"logger.tracking_uri={tracking_uri}",
        ],
        tmp_path,
        cache_dir,  # the synthetic data, generated once per session
    )
    run(cfg)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("medvr").experiment_id
    (found,) = client.search_runs([experiment], filter_string=f"tags.model = '{CASES[model_type][0]}'")
    assert found.info.status == "FINISHED"
    keys = ("train/loss", "train/explore/trigger_rate", "train/reward/grounding")
    history = {k: [m.value for m in client.get_metric_history(found.info.run_id, k)] for k in keys}
    assert len(history["train/loss"]) == 2
    assert all(v > 0 for v in history["train/explore/trigger_rate"])
    assert any(v > 0 for v in history["train/reward/grounding"])  # forced crops overlap the true boxes
    before = load_file(tiny_random[model_type] / "model.safetensors")
    after = load_file(tmp_path / "run" / "hf" / "final" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(before)
