"""algo=sft on the tiny model: the loss sees only the target, it trains and runs end to end; the baseline composes."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText

from conftest import SMALL_DATA, TWO_STEPS, compose_cfg
from medvr.algo import AlgoConfig
from medvr.config_checks import ConfigError, check_config
from medvr.module import GRPOModule
from medvr.rewards.answer import accuracy_reward, format_reward
from medvr.rollout.encode import encode_prompts, vision_token_ids
from medvr.sft import SFTConfig, SFTModule, encode_targets, target_loss
from medvr.train import run


def _sft_config(tmp_path, cache_dir, *overrides):
    return compose_cfg(["algo=sft", *TWO_STEPS, *overrides], tmp_path, cache_dir)


def _records(cfg) -> list[dict]:
    """The first training batch, as the module receives it."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def test_labels_cover_exactly_the_target_and_the_loss_is_their_cross_entropy(tmp_path, cache_dir, tiny):
    model, processor, prompt = tiny
    cfg = _sft_config(tmp_path, cache_dir, "data.batch_size=3")
    algo = instantiate(cfg.algo)
    records = _records(cfg)
    targets = [algo.target_text(r) for r in records]
    batch = encode_targets(processor, prompt, records, targets, None, "cpu")
    labels = torch.where(batch.loss_mask.bool(), batch.input_ids, -100)  # [B, L]
    prompts = encode_prompts(processor, prompt, records, repeat=1)
    tok = processor.tokenizer
    for row, target in enumerate(targets):
        ids = tok(target, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        n = len(ids)
        assert labels[row, -n:].tolist() == ids == batch.input_ids[row, -n:].tolist()
        assert (labels[row, :-n] == -100).all()  # padding and prompt
        # the prompt in front of the target is token for token the rollout's prompt
        rollout_prompt = prompts["input_ids"][row][prompts["attention_mask"][row].bool()]
        kept = batch.attention_mask[row].bool()
        assert torch.equal(batch.input_ids[row][kept][:-n], rollout_prompt)
    assert batch.images_per_row.tolist() == [1, 1, 1]

    # with no token forbidden, the loss is exactly HF's mean cross-entropy over the -100-masked labels
    with torch.no_grad():
        ours = target_loss(model, batch, torch.tensor([], dtype=torch.long), batch.loss_mask.sum())
        theirs = model(**batch.model_inputs(), labels=labels, use_cache=False).loss
        halves = sum(
            target_loss(model, mb, torch.tensor([], dtype=torch.long), batch.loss_mask.sum())
            for _, _, mb in batch.micro_batches(2)
        )
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert halves.item() == pytest.approx(ours.item(), rel=1e-5)  # micro-batches add up to the batch mean


def test_the_target_earns_full_format_and_accuracy_rewards(tmp_path, cache_dir, tiny):
    _, processor, prompt = tiny
    cfg = _sft_config(tmp_path, cache_dir)
    algo = instantiate(cfg.algo)
    records = [{**r, "answer": key} for r, key in zip(_records(cfg), "AB", strict=True)]
    batch = encode_targets(processor, prompt, records, [algo.target_text(r) for r in records], None, "cpu")
    # the targets as a rollout decodes its completions (special tokens such as <|im_end|> dropped)
    assert format_reward(batch.completions) == [1.0, 1.0]
    assert accuracy_reward(batch.completions, answer=["A", "B"]) == [1.0, 1.0]
    assert accuracy_reward(batch.completions, answer=["B", "A"]) == [0.0, 0.0]


@pytest.mark.slow
def test_repeated_steps_on_one_batch_lower_the_loss(tmp_path, cache_dir):
    cfg = _sft_config(tmp_path, cache_dir, "optimizer.lr=1e-3", "data.batch_size=4")
    parts = {n: instantiate(cfg[n]) for n in ("algo", "reward", "prompt", "explore", "optimizer")}
    module = parts["algo"].module_class(model=instantiate(cfg.model), **parts)
    assert isinstance(module, SFTModule) and module._frozen_ref == []  # no reference model
    records = _records(cfg)
    batch = encode_targets(
        module.processor, module.prompt, records, [module.algo.target_text(r) for r in records], None, "cpu"
    )
    forbidden = torch.tensor(vision_token_ids(module.processor))

    def loss() -> float:
        with torch.no_grad():
            return target_loss(module.policy.eval(), batch, forbidden, batch.loss_mask.sum()).item()

    before = loss()
    module.policy.train()
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([records] * 6, batch_size=None, collate_fn=lambda b: b))
    assert trainer.global_step == 6
    after = loss()
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_two_steps_change_the_policy_and_log_like_grpo(tmp_path, cache_dir, tiny):
    cfg = _sft_config(tmp_path, cache_dir, "optimizer.lr=1e-3", "algo.grad_accum=2", "trainer.val_check_interval=4")
    metrics = run(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0

    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs([client.get_experiment_by_name("medvr").experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["algo"] == "sft"
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        history = client.get_metric_history(found.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key  # one point per optimiser step (2 batches each)
    assert "train/reward" not in found.data.metrics
    assert all(m.value > 0 for m in client.get_metric_history(found.info.run_id, "train/loss"))
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val/acc")] == [2]

    # the exported policy differs from the tiny model it started from in (almost) every tensor
    start = dict(tiny[0].named_parameters())
    final = dict(AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "hf" / "final").named_parameters())
    assert final.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], final[k])]
    assert len(changed) > 0.9 * len(start)


def test_experiment_medvlm_r1_sft_is_the_grpo_recipe_with_sft(tmp_path):
    extra = [f"data.path={tmp_path}/OmniMedVQA"]
    sft = compose_cfg(["experiment=medvlm_r1_sft", *extra], tmp_path, tmp_path / "cache")
    grpo = compose_cfg(["experiment=medvlm_r1", *extra], tmp_path, tmp_path / "cache")
    assert sft.hydra.runtime.choices["algo"] == "sft" and sft.hydra.runtime.choices["data"] == "omnimedvqa"
    for key in ("data", "model", "trainer", "explore", "prompt", "logger"):
        assert sft[key] == grpo[key], key
    assert sft.data.source.sizes.train == {"MRI": 600} and sft.data.source.seed == 42
    algo = instantiate(sft.algo)
    assert isinstance(algo, SFTConfig) and algo.module_class is SFTModule
    assert (algo.grad_accum, sft.data.batch_size, sft.trainer.max_epochs) == (2, 1, 2)
    assert sft.optimizer.lr == 1e-5
    assert instantiate(grpo.algo).module_class is GRPOModule and isinstance(instantiate(grpo.algo), AlgoConfig)
    assert check_config(sft) == []


def test_a_target_without_the_answer_is_refused_before_anything_loads(tmp_path, cache_dir):
    cfg = compose_cfg(["algo=sft", *SMALL_DATA, "algo.target='<answer>B</answer>'"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=r"algo.target='<answer>B</answer>': expected a string holding \{answer\}"):
        check_config(cfg)
