"""LoRA, QLoRA and a frozen vision tower on the tiny model, trained through GRPOModule.

What must hold: only the intended parameters move; with LoRA the reference policy is the same model
with its adapters disabled (no second copy), equal to the policy until the adapters learn.
"""

from __future__ import annotations

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from peft.tuners.lora import LoraLayer

from conftest import FAST_MODEL, compose_cfg
from medvr.module import GRPOModule
from medvr.rewards.answer import format_reward
from medvr.rollout.generate import token_logps
from test_train import QUICK

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class Recorder(Logger):
    """Keeps every metrics dict the module logs, in order."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, float]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


def build(tmp_path, cache_dir, *overrides):
    cfg = compose_cfg([*QUICK, *overrides], tmp_path, cache_dir)
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    return GRPOModule(model=instantiate(cfg.model), **parts), cfg


def fit_two_steps(module, cfg, tmp_path) -> Recorder:
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=recorder, enable_checkpointing=False, default_root_dir=tmp_path,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert trainer.global_step == 2
    return recorder


def sample(module, cfg):
    """One training batch's rollouts, sampled the way training_step does."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.policy.eval()
    torch.manual_seed(0)
    rollouts = module.explore.rollout(
        module.policy, module.processor, module.prompt, batch,
        group_size=module.algo.group_size, temperature=module.algo.temperature,
    )
    module.policy.train()
    return rollouts


def policy_and_reference_logps(module, rollouts):
    with torch.no_grad():
        policy, _ = token_logps(module.policy, rollouts, module.algo.temperature, module.forbidden_ids)
        _, reference = module._fixed_logps(rollouts)
    return policy, reference


def trainable(module) -> set[str]:
    return {n for n, p in module.policy.named_parameters() if p.requires_grad}


def changed_since(module, before: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])}


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.policy.state_dict().items()}


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_lora_adapts_every_language_model_projection_and_nothing_else(tmp_path, cache_dir):
    cfg = compose_cfg([*FAST_MODEL, "model=tiny_lora"], tmp_path, cache_dir)
    model, _ = instantiate(cfg.model).load()
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    layers = cfg.model.text.num_hidden_layers
    assert adapted == {f"model.language_model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS}
    vision = model.get_base_model().model.visual
    assert any(isinstance(m, torch.nn.Linear) for m in vision.modules())  # Linear layers the regex had to leave out
    assert all(is_adapter(n) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.slow
def test_lora_trains_only_adapters_and_its_reference_is_the_base_model(tmp_path, cache_dir):
    # 4 prompts x 8 samples: both steps see groups whose rewards differ (a learning signal)
    module, cfg = build(tmp_path, cache_dir, "model=tiny_lora", "algo.group_size=8", "data.batch_size=4")
    assert module.algo.beta > 0 and module._frozen_ref == []  # the reference is the adapter-disabled policy
    adapters = trainable(module)
    assert adapters and all(is_adapter(n) for n in adapters)
    rollouts = sample(module, cfg)
    mask = rollouts.loss_mask.bool()
    policy0, reference0 = policy_and_reference_logps(module, rollouts)
    assert torch.equal(policy0[mask], reference0[mask])  # lora_B starts at 0: KL exactly 0
    before = snapshot(module)

    recorder = fit_two_steps(module, cfg, tmp_path)

    changed = changed_since(module, before)
    assert changed <= adapters  # every base weight bit-identical
    # every lora_B moved (lora_A has no gradient while B is 0, so it moves only if step 2 has a signal)
    assert {n for n in adapters if "lora_B" in n} <= changed
    kl = recorder.series("train/kl")
    assert kl[0] == 0.0 and kl[1] > 0.0
    policy1, reference1 = policy_and_reference_logps(module, rollouts)
    assert torch.equal(reference1[mask], reference0[mask])  # adapters disabled = the untouched base
    assert (policy1[mask] - reference1[mask]).abs().max() > 1e-4


@pytest.mark.slow
def test_freeze_vision_keeps_the_vision_tower_fixed_in_full_finetuning(tmp_path, cache_dir):
    module, cfg = build(tmp_path, cache_dir, "model.freeze_vision=true", "algo.beta=0")
    before = snapshot(module)
    vision = {k for k in before if k.startswith("model.visual.")}
    language = {k for k in before if k.startswith("model.language_model.")}
    assert vision and language and not (vision & trainable(module))

    fit_two_steps(module, cfg, tmp_path)

    changed = changed_since(module, before)
    assert not (changed & vision)
    assert len(changed & language) > 0.9 * len(language)


@pytest.fixture(scope="module")
def qlora(tmp_path_factory, cache_dir):
    return build(tmp_path_factory.mktemp("qlora"), cache_dir, "model=tiny_qlora")


def test_qlora_base_is_4bit_and_only_float_adapters_train(qlora):
    module, cfg = qlora
    assert module._frozen_ref == []
    adapted = [m for m in module.policy.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 7 * cfg.model.text.num_hidden_layers
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted)
    assert all(m.base_layer.weight.dtype == torch.uint8 for m in adapted)  # packed NF4, two weights a byte
    params = dict(module.policy.named_parameters())
    assert all(is_adapter(n) and params[n].dtype == torch.float32 for n in trainable(module))


@pytest.mark.slow
def test_qlora_samples_the_policy_that_training_scores(qlora):
    module, cfg = qlora
    rollouts = sample(module, cfg)
    mask = rollouts.loss_mask.bool()
    assert sum(format_reward(rollouts.completions)) / len(rollouts) >= 0.25  # the 4-bit policy is not broken (0 if it were)
    # sampling in eval mode must not switch bitsandbytes to its CPU inference layout (see models/spec.py)
    linears = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)
    policy, reference = policy_and_reference_logps(module, rollouts)
    torch.testing.assert_close(policy[mask], rollouts.gen_logps[mask], atol=1e-4, rtol=0)
    assert torch.equal(policy[mask], reference[mask])


@pytest.mark.slow
def test_qlora_trains_only_the_adapters(tmp_path, cache_dir):
    module, cfg = build(tmp_path, cache_dir, "model=tiny_qlora")
    adapters = trainable(module)
    before = snapshot(module)

    recorder = fit_two_steps(module, cfg, tmp_path)

    assert changed_since(module, before) == adapters  # the 4-bit base (weights and quant state) is untouched
    losses, kl = recorder.series("train/loss"), recorder.series("train/kl")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert kl[0] == 0.0 and kl[1] > 0.0
