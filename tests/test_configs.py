"""Every option of every config group composes and instantiates; bad options fail with Hydra's list."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, compose_cfg
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

GROUPS = {
    group: sorted(p.stem for p in (Path(CONF) / group).glob("*.yaml"))
    for group in ("model", "data", "prompt", "reward", "explore", "algo", "logger")
}
OPTIONS = [(g, o) for g, opts in GROUPS.items() for o in opts]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_instantiates(group, option, tmp_path):
    # real datasets name no default location (`path: ???`); nothing is read before setup()
    needs_path = group == "data" and OmegaConf.is_missing(OmegaConf.load(Path(CONF) / group / f"{option}.yaml"), "path")
    extra = [f"data.path={tmp_path}/dataset"] if needs_path else []
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path, tmp_path / "cache")
    obj = instantiate(cfg[group])
    assert obj is not None
    if group == "reward":
        # the columns GRPOModule passes: dataset columns, the completion's group and its zoom boxes
        columns = dict(answer=["A"], options=[["a", "b"]], bbox=[[0, 0, 8, 8]], group=[0], zoom_boxes=[[]])
        scores = obj(["<think>x</think><answer>A</answer>"], **columns)
        assert len(scores) == 1 and scores[0] > 0


def test_experiment_medvlm_r1_sets_the_paper_recipe(tmp_path):
    cfg = compose_cfg(["experiment=medvlm_r1"], tmp_path, tmp_path / "cache")
    assert cfg.model.hub_id == "Qwen/Qwen2-VL-2B-Instruct" and cfg.model.max_pixels == 401408
    algo = instantiate(cfg.algo)
    assert (algo.group_size, algo.beta, algo.num_iterations, algo.grad_accum) == (4, 0.04, 1, 2)
    assert (algo.temperature, algo.loss_type, algo.scale_rewards, algo.advantage_eps) == (1.0, "grpo", "group", 1e-4)
    assert cfg.optimizer.lr == 1e-6 and cfg.explore.max_new_tokens == 512
    assert cfg.data.batch_size == 1 and cfg.trainer.max_epochs == 2
    assert sorted(instantiate(cfg.reward).names) == ["accuracy", "format"]
    # full fine-tuning at lr 1e-6: fp32 master weights, bf16 compute (bf16 weights would round the updates away)
    assert cfg.model.dtype == "float32" and cfg.model.lora is None and cfg.trainer.precision == "bf16-mixed"


def test_experiment_medvr_mini_sweeps_the_six_arms_over_two_seeds(tmp_path):
    cfg = compose_cfg(["experiment=medvr_mini"], tmp_path, tmp_path / "cache")
    params = cfg.hydra.sweeper.params
    arms = params["+arm"].split(",")
    assert params["seed"] == "0,1" and cfg.logger.experiment_name == "medvr_mini"
    assert sorted(arms) == sorted(p.stem for p in (Path(CONF) / "arm").glob("*.yaml"))
    chosen = {}
    for arm in arms:
        arm_cfg = compose_cfg(["experiment=medvr_mini", f"+arm={arm}"], tmp_path, tmp_path / "cache")
        chosen[arm] = (arm_cfg.hydra.runtime.choices.explore, arm_cfg.hydra.runtime.choices.reward)
        assert arm_cfg.data.source.train_question_types is None, arm  # every arm is taught the same items
    assert chosen == {
        "none": ("none", "r1"), "tool": ("tool", "r1"), "evr": ("evr", "r1"), "random_crop": ("random_crop", "r1"),
        "evr_cca": ("evr", "cca"), "evr_grounding_gt": ("evr", "grounding_gt"),
    }


def test_every_callback_and_the_trainer_instantiate(tmp_path):
    cfg = compose_cfg(["trainer.max_steps=7", "trainer.accelerator=cpu"], tmp_path, tmp_path / "cache")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    assert trainer.max_steps == 7 and len(callbacks) == len(cfg.callbacks)


def test_unknown_option_lists_the_valid_ones(tmp_path):
    root = Path(CONF).parent
    out = subprocess.run(
        [sys.executable, "train.py", "reward=nope", f"paths.output_dir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "Could not find 'reward/nope'" in out.stderr
    for option in GROUPS["reward"]:
        assert option in out.stderr


def test_bad_algo_value_names_the_key(tmp_path):
    cfg = compose_cfg(["algo.loss_type=ppo"], tmp_path, tmp_path / "cache")
    with pytest.raises(InstantiationException, match="algo.loss_type='ppo' is not one of"):
        instantiate(cfg.algo)


@pytest.mark.parametrize("overrides, trained", [
    ([], ["quadrant", "side", "modality"]),  # the demo: the whole-image types
    (["explore=evr"], ["quadrant", "side", "modality"]),  # the same items whatever the explore option
    (["data=synthetic"], None),
    (["experiment=medvr_mini", "+arm=evr"], None),
    (["data=synthetic", "data.source.question_types=[shape,side]", "data.source.train_question_types=[side]"], ["side"]),
])
def test_synthetic_train_types(overrides, trained, tmp_path):
    cfg = compose_cfg(overrides, tmp_path, tmp_path / "cache")
    assert OmegaConf.to_container(cfg.data.source, resolve=True)["train_question_types"] == trained
    source = instantiate(cfg.data.source)
    expected = trained or list(cfg.data.source.question_types or ["quadrant", "side", "modality", "shape", "texture",
                                                                    "count"])
    assert list(source.train_question_types) == expected
    assert source.sizes["test"] == (192 if cfg.hydra.runtime.choices.data == "synthetic_demo" else 96)
