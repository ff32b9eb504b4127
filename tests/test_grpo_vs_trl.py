"""Differential tests: medvr.grpo and medvr.rewards against the installed TRL's own GRPOTrainer code.

TRL's advantage and loss code is inline in `GRPOTrainer._generate_and_score_completions` and
`GRPOTrainer._compute_loss`; both are called unbound on a stand-in object that holds only the attributes
they read, with generation and the model forward replaced by prepared completions and log-probs.
Everything TRL does on top of GRPO proper is switched off: vLLM importance sampling, entropy masking,
off-policy masking, `delta` clipping, and `use_bias_correction_kl` (TRL >= 1.x defaults it to True;
medvr's KL is the plain k3 term of DeepSeekMath and MedVLM-R1).
"""

import functools
import itertools
import types
from collections import defaultdict

import pytest
import torch
from accelerate import PartialState
from trl import GRPOTrainer

from medvr.grpo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, group_advantages, policy_loss
from medvr.rewards import WeightedSum, accuracy_reward, format_reward

N, T = 4, 7
LENGTHS = torch.tensor([7, 5, 2, 0])  # ragged, with an empty completion
ROW_LOG_RATIO = torch.tensor([0.4, -0.4, 0.05, 0.3])  # sequence ratios on both sides of the clip
ADVANTAGES = torch.tensor([1.0, -0.5, 0.8, -1.2])


def metrics_store():
    return defaultdict(lambda: defaultdict(list))


def trl_stand_in(**attributes):
    """The attributes GRPOTrainer's methods read, on a plain object; single process, no accumulation."""
    defaults = {
        "model": types.SimpleNamespace(training=True, is_gradient_checkpointing=False),
        "accelerator": types.SimpleNamespace(
            device=torch.device("cpu"), num_processes=1, process_index=0, is_main_process=True,
            sync_gradients=True, gather=lambda tensor: tensor, reduce=lambda tensor, reduction: tensor,
        ),
        "args": types.SimpleNamespace(
            use_bias_correction_kl=False, delta=None, steps_per_generation=1, gradient_accumulation_steps=1,
            per_device_train_batch_size=N, gradient_checkpointing_kwargs=None, report_to=[],
        ),
        "state": types.SimpleNamespace(global_step=0),
        "_metrics": metrics_store(),
        "num_iterations": 1,
        "current_gradient_accumulation_steps": 1,
        "use_vllm": False,
        "vllm_importance_sampling_correction": False,
        "off_policy_mask_threshold": None,
        "top_entropy_quantile": 1.0,
        "aux_loss_enabled": False,
        # An entropy bonus with coefficient 0 changes nothing but makes TRL log "policy_loss".
        "_entropy_bonus_enabled": True,
        "entropy_coef": 0.0,
        "use_adaptive_entropy": False,
        "beta": 0.0,
    }
    return types.SimpleNamespace(**{**defaults, **attributes})


def trl_loss(logps, old_logps, ref_logps, advantages, mask, *, num_items, **settings):
    """Loss and logged metrics from `GRPOTrainer._compute_loss`, with `logps` as the model's log-probs."""
    entropies = torch.ones_like(logps)
    trainer = trl_stand_in(**settings)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long),
        "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": torch.tensor(num_items),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    return loss, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def prepared_batch(token_advantages: bool):
    generator = torch.Generator().manual_seed(0)
    mask = (torch.arange(T) < LENGTHS.unsqueeze(1)).long()  # [N, T]
    logps = -torch.rand(N, T, generator=generator) * 3  # [N, T]
    log_ratio = ROW_LOG_RATIO.unsqueeze(1) + (torch.rand(N, T, generator=generator) - 0.5) * 0.6  # [N, T]
    old_logps = logps - log_ratio  # [N, T]
    ref_logps = logps + torch.randn(N, T, generator=generator) * 0.3  # [N, T]
    advantages = ADVANTAGES
    if token_advantages:
        advantages = ADVANTAGES.unsqueeze(1) * torch.randn(N, T, generator=generator).sign()  # [N, T]
    return logps, old_logps, ref_logps, advantages, mask


@pytest.mark.parametrize("token_advantages", [False, True], ids=["seq_adv", "token_adv"])
@pytest.mark.parametrize("on_policy", [False, True], ids=["off_policy", "on_policy"])
@pytest.mark.parametrize(("epsilon_low", "epsilon_high"), [(0.2, 0.2), (0.2, 0.28)], ids=["sym", "asym"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_trl(loss_type, level, beta, epsilon_low, epsilon_high, on_policy, token_advantages):
    logps, old_logps, ref_logps, advantages, mask = prepared_batch(token_advantages)
    old_logps = None if on_policy else old_logps
    ref_logps = ref_logps if beta else None
    settings = {
        "loss_type": loss_type, "beta": beta, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high,
        "importance_sampling_level": level, "max_completion_length": T + 3,
    }
    num_items = int(mask.sum()) + 9  # the generation batch holds more tokens than this micro-batch

    trl_logps = logps.clone().requires_grad_()
    expected, trl_metrics = trl_loss(trl_logps, old_logps, ref_logps, advantages, mask, num_items=num_items, **settings)
    expected.backward()
    ours_logps = logps.clone().requires_grad_()
    loss, parts = policy_loss(ours_logps, old_logps, ref_logps, advantages, mask, num_items=num_items, **settings)
    loss.backward()

    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad, atol=1e-6, rtol=0)
    logged = {"policy_loss": "policy_loss", "clip_ratio/low": "clip_ratio/low_mean",
              "clip_ratio/high": "clip_ratio/high_mean", "clip_ratio/region": "clip_ratio/region_mean"}
    if beta:
        logged["kl"] = "kl"
    for ours, theirs in logged.items():
        assert parts[ours].item() == pytest.approx(trl_metrics[theirs], abs=1e-6), ours
    if not on_policy:  # the prepared ratios bind the clip on both sides
        assert parts["clip_ratio/low"] > 0 and parts["clip_ratio/high"] > 0


def trl_advantages(rewards_per_func, weights, columns, group_size, scale):
    """`advantages` from `GRPOTrainer._generate_and_score_completions`, rewards computed by TRL's own
    `_calculate_rewards` from the given reward functions; generation is replaced by fixed token ids."""
    names = list(rewards_per_func)
    num = len(columns["completions"])
    prompt_ids, completion_ids = [[1, 2]] * num, [[3, 4, 5]] * num
    generated = (prompt_ids, completion_ids, None, columns["completions"], None, {}, None, None)
    trainer = trl_stand_in(
        environment_factories=None, environments=None, tools=[], pad_to_multiple_of=None,
        mask_truncated_completions=False, _tokenizer=types.SimpleNamespace(pad_token_id=0),
        reward_funcs=list(rewards_per_func.values()), reward_func_names=names,
        reward_processing_classes=[None] * len(names), reward_weights=torch.tensor(weights),
        multi_objective_aggregation="sum_then_normalize", scale_rewards=scale, num_generations=group_size,
        _logs={"prompt": [], "completion": [], "advantages": [], "rewards": defaultdict(list),
               "extra": defaultdict(list), "images": []},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False,
        _generate=lambda prompts: generated,
    )
    PartialState()  # TRL logs through accelerate, which needs its (single-process) state
    trainer._calculate_rewards = types.MethodType(GRPOTrainer._calculate_rewards, trainer)
    trainer._log_completion_extra = types.MethodType(GRPOTrainer._log_completion_extra, trainer)
    trainer._log_metric = types.MethodType(GRPOTrainer._log_metric, trainer)
    rows = [
        {"prompt": f"question {row}", **{key: values[row] for key, values in columns.items() if key != "completions"}}
        for row in range(num)
    ]
    return GRPOTrainer._generate_and_score_completions(trainer, rows)["advantages"]


NAN_REWARDS = [1.0, 0.0, None, 1.0, 2.0, 2.0, 2.0, 2.0, None, None, None, None, 0.5, None, 1.5, 3.0, None, 4.0,
               0.0, 0.25]


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale, group_size):
    def preset(completions, **_):
        return NAN_REWARDS

    columns = {"completions": ["c"] * len(NAN_REWARDS)}
    expected = trl_advantages({"preset": preset}, [1.0], columns, group_size, scale)
    rewards = torch.tensor([float("nan") if r is None else r for r in NAN_REWARDS])  # [N]
    torch.testing.assert_close(group_advantages(rewards, group_size, scale=scale), expected, atol=1e-6, rtol=0)


def has_box(completions, bbox, **_):
    return [None if box is None else 0.5 for box in bbox]


@pytest.mark.parametrize(
    ("terms", "weights"),
    [
        ({"accuracy": functools.partial(accuracy_reward), "format": format_reward}, [1.0, 1.0]),
        ({"accuracy": accuracy_reward, "format": format_reward, "box": has_box}, [2.0, 0.5, -1.0]),
        ({"accuracy": accuracy_reward, "box": has_box}, [1.0, 2.0]),  # rows with neither are unscorable
    ],
)
def test_weighted_sum_and_advantages_match_trl_reward_pipeline(terms, weights):
    options = ["Left lung", "Right lung", "Heart", "Liver"]
    answers = ["B", "(B)", "B) Right lung", "A", "<think>x</think>", "B or C"]
    completions = [
        (f"<think>look</think><answer>{a}</answer>" if i % 2 else f"<answer>{a}</answer>")
        for i, a in itertools.islice(enumerate(itertools.cycle(answers)), 12)
    ]
    columns = {
        "completions": completions,
        "answer": ["B", "B", "B", None, "B", "B", None, "B", "C", None, "A", "B"],
        "options": [options] * 12,
        "bbox": [None, [1, 2, 3, 4], None, None, [0, 0, 9, 9], None] * 2,
    }
    reward = WeightedSum(terms=terms, weights=dict(zip(terms, weights, strict=True)))
    totals, _ = reward.score(**columns)
    for scale in ("group", "batch", "none"):
        expected = trl_advantages(terms, weights, columns, 3, scale)
        advantages = group_advantages(torch.tensor(totals), 3, scale=scale)  # [N]
        torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
