"""The multi-turn rollout engine on the tiny model: masks, images, spans, limits, log-prob equality."""

from __future__ import annotations

import mlflow
import pytest
import torch
from conftest import FAST_MODEL, TWO_STEPS, compose_cfg
from hydra.utils import instantiate

from medvr.data import synthetic
from medvr.explore.trajectory import Trajectory, Zoom, assemble
from medvr.rollout.encode import encode_prompts, stop_token_ids, vision_token_ids
from medvr.rollout.generate import token_logps
from medvr.train import run


def _explore(option: str, overrides: list[str], tmp_path, cache_dir):
    cfg = compose_cfg([*FAST_MODEL, f"explore={option}", *overrides], tmp_path, cache_dir)
    return instantiate(cfg.explore)


@pytest.fixture(scope="module")
def records():
    return [it.record for it in synthetic.generate(3, seed=5, split="train")]


def _check_logps(model, processor, rollouts, tol=1e-4):
    forbidden = torch.tensor(vision_token_ids(processor))
    logps, _ = token_logps(model, rollouts, 1.0, forbidden)
    assert torch.isfinite(logps).all()  # observation placeholders are forbidden tokens: never -inf in the output
    mask = rollouts.loss_mask.bool()
    assert mask.any()
    assert (logps - rollouts.gen_logps)[mask].abs().max().item() < tol


def test_random_crop_trajectories_have_two_images_masks_and_exact_logps(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    explore = _explore(
        "random_crop",
        ["explore.trigger.rate=1.0", "explore.trigger.min_tokens=2", "explore.trigger.span=1", "explore.max_turns=1"],
        tmp_path,
        cache_dir,
    )
    torch.manual_seed(0)
    ro = explore.rollout(model, processor, prompt, records, group_size=4, temperature=1.0)
    # the trigger fires in every row that is still thinking after min_tokens; a sample that closes
    # `</think>` within them answers without a crop (one image)
    triggered = [len(z) for z in ro.extras["zooms"]]
    assert len(ro) == 12 and set(triggered) <= {0, 1} and sum(triggered) >= 10
    assert ro.images_per_row.tolist() == [1 + t for t in triggered]
    assert ro.image_grid_thw.shape == (12 + sum(triggered), 3)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = 4  # 2x2 spatial merge
    per_row_tokens = (ro.input_ids == image_id).sum(1)  # [N]
    grids = torch.stack([g.sum() for g in ro.image_grid_thw.prod(-1).split(ro.images_per_row.tolist())]) // merge
    assert torch.equal(per_row_tokens, grids)
    assert torch.equal(ro.mm_token_type_ids.bool(), ro.input_ids == image_id)
    # observation tokens (the crop's placeholders) and prompt tokens never enter the loss
    assert not (ro.loss_mask.bool() & (ro.mm_token_type_ids == 1)).any()
    stats = explore.stats(ro)
    rate = sum(triggered) / 12
    assert stats["zooms_per_rollout"] == rate and stats["trigger_rate"] == rate and stats["turns"] == pytest.approx(1 + rate)
    for row, zooms in enumerate(ro.extras["zooms"]):
        if not zooms:  # it closed its thinking within the min_tokens=2 the trigger waits for
            assert "</think>" in processor.tokenizer.decode(ro.input_ids[row][ro.loss_mask[row].bool()][:2])
            continue
        (zoom,) = zooms
        lo, hi = zoom.span
        assert zoom.forced and zoom.error is None and zoom.box is not None
        assert ro.loss_mask[row, lo:hi].sum() == 0  # the random action is the environment's, not the policy's
        assert processor.tokenizer.decode(ro.input_ids[row, lo:hi]) == zoom.action
        assert ro.loss_mask[row, : lo].sum() >= 2  # min_tokens policy tokens came before the trigger
        assert len(ro.extras["crops"][row]) == 1
        assert "<zoom>[" in ro.completions[row]
    _check_logps(model, processor, ro)


def test_evr_forces_zoom_prefix_and_model_writes_the_box(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    overrides = ["explore.trigger.mode=absolute", "explore.trigger.threshold=0.0", "explore.trigger.min_tokens=3"]
    explore = _explore("evr", overrides, tmp_path, cache_dir)
    torch.manual_seed(1)
    ro = explore.rollout(model, processor, prompt, records, group_size=2, temperature=1.0)
    tok = processor.tokenizer
    assert sum(any(z.forced for z in zooms) for zooms in ro.extras["zooms"]) >= 5
    for row, zooms in enumerate(ro.extras["zooms"]):
        forced = [z for z in zooms if z.forced]
        if not forced:  # the sample stopped (`<|im_end|>` or `</think>`) within the min_tokens=3 the trigger waits for
            assert ro.loss_mask[row].sum() <= 3 or "</think>" in tok.decode(ro.input_ids[row][ro.loss_mask[row].bool()][:3])
            continue
        assert len(forced) == 1  # threshold 0: fires at min_tokens, at most max_triggers=1 times
        lo, hi = forced[0].span
        start = int(ro.attention_mask[row].float().argmax())
        policy_before = ro.loss_mask[row, :lo].sum().item()
        assert policy_before == 3  # cut right at min_tokens
        prefix = tok("<zoom>[", add_special_tokens=False)["input_ids"]
        assert ro.input_ids[row, lo : lo + len(prefix)].tolist() == prefix
        assert ro.loss_mask[row, lo : lo + len(prefix)].sum() == 0  # forced tokens: no loss
        assert ro.loss_mask[row, lo + len(prefix) : hi].all()  # the box the model wrote: policy tokens
        assert forced[0].entropy is not None and forced[0].entropy >= 0.0
        assert start < lo
    _check_logps(model, processor, ro)


def test_branching_keeps_the_unregrounded_twin(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    overrides = ["explore.trigger.mode=absolute", "explore.trigger.threshold=0.0", "explore.trigger.branch=true"]
    explore = _explore("evr", overrides, tmp_path, cache_dir)
    torch.manual_seed(2)
    ro = explore.rollout(model, processor, prompt, records[:2], group_size=4, temperature=1.0)
    assert len(ro) == 8
    zooms = ro.extras["zooms"]
    for root in range(0, 8, 2):
        assert any(z.forced for z in zooms[root])
        assert not any(z.forced for z in zooms[root + 1])
        cut = next(z for z in zooms[root] if z.forced).span[0]
        # the twin shares the root's tokens up to the cut (both rows are right-aligned after padding)
        n_root = int(ro.attention_mask[root].sum())
        n_twin = int(ro.attention_mask[root + 1].sum())
        width = ro.input_ids.shape[1]
        shared = cut - (width - n_root)
        assert torch.equal(
            ro.input_ids[root, width - n_root : cut], ro.input_ids[root + 1, width - n_twin : width - n_twin + shared]
        )
    with pytest.raises(ValueError, match="even"):
        explore.rollout(model, processor, prompt, records[:1], group_size=3, temperature=1.0)


def _cut_by_budget(ro, processor) -> list[bool]:
    """Per row: its last policy token is not a stop token (the budget, not the policy, ended it)."""
    last = [ro.input_ids[row][ro.loss_mask[row].bool()][-1].item() for row in range(len(ro))]
    return [token not in stop_token_ids(processor) for token in last]


def test_budgets_and_turn_limit(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    explore = _explore("tool", ["explore.max_new_tokens=6"], tmp_path, cache_dir)
    ro = explore.rollout(model, processor, prompt, records, group_size=2, temperature=1.0)
    assert ro.loss_mask.sum(1).max() <= 6
    assert ro.truncated.tolist() == _cut_by_budget(ro, processor) and ro.truncated.any()
    # no room for any observation: the trajectory is cut, its crop never enters the batch
    tight = _explore(
        "random_crop", ["explore.trigger.rate=1.0", "explore.trigger.span=1", "explore.max_total_tokens=8"], tmp_path, cache_dir
    )
    ro = tight.rollout(model, processor, prompt, records, group_size=2, temperature=1.0)
    assert ro.images_per_row.tolist() == [1] * 6 and ro.truncated.tolist() == _cut_by_budget(ro, processor)
    # one zoom too many ends the trajectory: cut by the turn limit, masked out when asked
    masking = _explore("tool", ["explore.max_turns=1", "explore.mask_over_turn=true"], tmp_path, cache_dir)
    t = Trajectory.from_prompts(encode_prompts(processor, prompt, records[:1], 1), records[:1])[0]
    t.zooms.append(Zoom("<zoom>[0, 0, 500, 500]</zoom>", span=(0, 0), forced=False))
    assert masking._zoom(t, Zoom("<zoom>[0, 0, 9, 9]</zoom>", span=(0, 0), forced=False)) is None
    assert t.done and t.truncated and t.over_turn
    t.masked = t.over_turn
    batch = assemble([t], processor.tokenizer.pad_token_id, 1, "cpu")
    assert batch.loss_mask.sum() == 0


def test_greedy_eval_never_triggers_unless_asked(tiny, records, tmp_path, cache_dir):
    model, processor, prompt = tiny
    overrides = ["explore.trigger.rate=1.0", "explore.trigger.span=1"]
    explore = _explore("random_crop", overrides, tmp_path, cache_dir)
    ro = explore.rollout(model, processor, prompt, records, group_size=1, temperature=1.0, greedy=True)
    assert explore.stats(ro)["trigger_rate"] == 0.0
    explore = _explore("random_crop", [*overrides, "explore.trigger_at_eval=true"], tmp_path, cache_dir)
    ro = explore.rollout(model, processor, prompt, records, group_size=1, temperature=1.0, greedy=True)
    assert explore.stats(ro)["trigger_rate"] == 1.0


@pytest.mark.parametrize("option", ["tool", "evr", "random_crop"])
def test_two_training_steps_per_explore_option(option, tmp_path, cache_dir):
    cfg = compose_cfg(
        [*TWO_STEPS, f"explore={option}", "callbacks.rollout_samples.every_n_steps=1"], tmp_path, cache_dir
    )
    run(cfg)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    (found,) = client.search_runs(
        [client.get_experiment_by_name("medvr").experiment_id], filter_string=f"tags.explore = '{option}'"
    )
    assert found.info.status == "FINISHED" and found.data.tags["explore"] == option
    metrics = found.data.metrics
    for key in ("zooms_per_rollout", "trigger_rate", "invalid_actions", "turns"):
        assert f"train/explore/{key}" in metrics, key
    assert metrics["train/explore/turns"] >= 1.0
    if option != "tool":  # some step forced a zoom
        history = client.get_metric_history(found.info.run_id, "train/explore/trigger_rate")
        assert max(m.value for m in history) > 0.0 and "train/explore/entropy_at_trigger" in metrics
    assert len(client.get_metric_history(found.info.run_id, "train/loss")) == 2
