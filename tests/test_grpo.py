"""GRPO tensor math on hand-computed cases (float64 unless a test says otherwise)."""

import math

import pytest
import torch

from medvr.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_TYPES,
    entropy_from_logits,
    group_advantages,
    masked_mean,
    policy_loss,
    selective_log_softmax,
)

F64 = torch.float64


def test_group_advantages_medvlm_r1_example():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    # mean 0.5, unbiased std sqrt(1/3): 0.5 / (0.57735 + 1e-4) = 0.8659
    expected = torch.tensor([0.8659, -0.8659, -0.8659, 0.8659], dtype=F64)
    torch.testing.assert_close(advantages, expected, atol=1e-4, rtol=0)


def test_group_advantages_equal_rewards_give_zero():
    advantages = group_advantages(torch.tensor([2.0, 2.0, 0.5, 0.5], dtype=F64), 2)
    assert torch.equal(advantages, torch.zeros(4, dtype=F64))


def test_group_advantages_nan_rewards_are_zero_and_excluded_from_the_statistics():
    rewards = torch.tensor([1.0, 0.0, float("nan"), 1.0, float("nan"), 3.0, float("nan"), float("nan")], dtype=F64)
    advantages = group_advantages(rewards, 4)
    std = math.sqrt((1 / 9 + 4 / 9 + 1 / 9) / 2)  # of [1, 0, 1] around 2/3
    expected = torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3], dtype=F64) / (std + 1e-4)
    torch.testing.assert_close(advantages[:4], expected)
    # A group with a single scored entry has no spread: every advantage is 0, not NaN.
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=F64))


def test_group_advantages_batch_and_none_scales():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    # group means [0.5, 0]; batch std of [1, 0, 0, 0] (mean 0.25, unbiased) = 0.5
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=F64) / (0.5 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected)
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0, float("nan"), 5.0], dtype=F64)
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    assert torch.equal(group_advantages(rewards, 2, scale="none"), expected)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="scale='mean'"):
        group_advantages(torch.zeros(4), 2, scale="mean")
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(6), 4)


# Two sequences of three tokens; the second is ragged (two active tokens).
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADVANTAGES = torch.tensor([1.0, -1.0], dtype=F64)
RATIOS = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 7.0]], dtype=F64)  # the 7.0 sits on a masked token


def off_policy_logps():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -2.2]], dtype=F64)
    return (old + RATIOS.log()).requires_grad_(), old


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # per-token -min(r A, clip(r) A): row 0 [-1.2, -0.5, -1.0], row 1 [0.8, 1.5]
        ("grpo", (-2.7 / 3 + 2.3 / 2) / 2),
        ("bnpo", -0.4 / 5),
        ("dr_grpo", -0.4 / (2 * 8)),
        ("dapo", -0.4 / 20),
    ],
)
def test_policy_loss_clipped_hand_computed(loss_type, expected):
    logps, old = off_policy_logps()
    loss, parts = policy_loss(
        logps, old, None, ADVANTAGES, MASK, loss_type=loss_type, max_completion_length=8, num_items=20
    )
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
    assert parts["policy_loss"] == loss.detach() and parts["kl"] == 0.0
    # low: r = 0.5 < 0.8 with A < 0 (row 1); high: r = 1.5 > 1.2 with A > 0 (row 0); of 5 active tokens
    torch.testing.assert_close(parts["clip_ratio/low"], torch.tensor(0.2, dtype=F64))
    torch.testing.assert_close(parts["clip_ratio/high"], torch.tensor(0.2, dtype=F64))
    torch.testing.assert_close(parts["clip_ratio/region"], torch.tensor(0.4, dtype=F64))
    torch.testing.assert_close(parts["ratio_mean"], torch.tensor(1.0, dtype=F64))
    if loss_type == "grpo":
        loss.backward()
        # Clipped tokens get no gradient; unclipped ones get -r A / (tokens in row) / rows.
        expected_grad = torch.tensor([[0.0, -0.5 / 6, -1.0 / 6], [0.0, 1.5 / 4, 0.0]], dtype=F64)
        torch.testing.assert_close(logps.grad, expected_grad)


def test_policy_loss_on_policy_is_minus_the_advantage():
    logps = torch.randn(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0], dtype=F64)
    expected = {"grpo": (-1.0 + 2.0) / 2, "bnpo": -1.0 / 4, "dr_grpo": -1.0 / (2 * 4), "dapo": -1.0 / 4}
    for loss_type, value in expected.items():
        loss, parts = policy_loss(logps, None, None, advantages, mask, loss_type=loss_type, max_completion_length=4)
        torch.testing.assert_close(loss, torch.tensor(value, dtype=F64))
        assert parts["ratio_mean"] == 1.0 and parts["clip_ratio/region"] == 0.0


def test_policy_loss_sequence_level_is_gspo():
    logps, old = off_policy_logps()
    loss, parts = policy_loss(logps, old, None, ADVANTAGES, MASK, importance_sampling_level="sequence")
    ratio = torch.tensor([0.75 ** (1 / 3), 0.75 ** (1 / 2)], dtype=F64)  # exp of the masked mean log-ratio
    torch.testing.assert_close(loss, (-ratio[0] + ratio[1]) / 2)
    torch.testing.assert_close(parts["ratio_mean"], ratio.mean())  # averaged over sequences, not tokens
    assert parts["clip_ratio/region"] == 0.0


def test_policy_loss_kl_term():
    logps = torch.log(torch.tensor([[0.2, 0.5], [0.1, 0.3]], dtype=F64))
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([0.5, -0.5], dtype=F64)
    plain, _ = policy_loss(logps, None, None, advantages, mask)
    same, parts = policy_loss(logps, None, logps.clone(), advantages, mask, beta=0.04)
    assert parts["kl"] == 0.0 and same == plain
    loss, parts = policy_loss(logps, None, logps + math.log(2.0), advantages, mask, beta=0.04, loss_type="bnpo")
    kl = 2.0 - math.log(2.0) - 1.0  # k3 = exp(d) - d - 1 with d = ref - logp = log 2
    torch.testing.assert_close(parts["kl"], torch.tensor(kl, dtype=F64))
    torch.testing.assert_close(loss, torch.tensor((-0.5 - 0.5 + 0.5) / 3 + 0.04 * kl, dtype=F64))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        policy_loss(logps, None, None, advantages, mask, beta=0.04)


def test_policy_loss_dapo_defaults_to_the_active_tokens():
    logps, old = off_policy_logps()
    default, _ = policy_loss(logps, old, None, ADVANTAGES, MASK, loss_type="dapo")
    explicit, _ = policy_loss(logps, old, None, ADVANTAGES, MASK, loss_type="dapo", num_items=torch.tensor(5))
    torch.testing.assert_close(default, explicit)


def test_policy_loss_rejects_bad_arguments():
    logps, old = off_policy_logps()
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        policy_loss(logps, old, None, ADVANTAGES, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level='word'"):
        policy_loss(logps, old, None, ADVANTAGES, MASK, importance_sampling_level="word")
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, None, ADVANTAGES, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"advantages \[N\] or \[N, T\]"):
        policy_loss(logps, old, None, ADVANTAGES[:1], MASK)


def random_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, 6, generator=generator, dtype=F64) * 3  # [N, T]
    old = logps + torch.randn(4, 6, generator=generator, dtype=F64) * 0.4  # [N, T]
    ref = logps + torch.randn(4, 6, generator=generator, dtype=F64) * 0.2  # [N, T]
    mask = (torch.arange(6) < torch.tensor([[6], [4], [1], [0]])).long()  # [N, T], one empty row
    advantages = torch.tensor([1.2, -0.7, 0.3, 0.9], dtype=F64)  # [N]
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_gradient_is_finite_and_zero_on_masked_tokens(loss_type, level):
    logps, old, ref, mask, advantages = random_batch(0)
    logps[mask == 0] = -80.0  # padding positions may hold anything finite
    logps.requires_grad_()
    loss, parts = policy_loss(
        logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.04,
        importance_sampling_level=level, max_completion_length=6,
    )
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(value) for value in parts.values())
    assert torch.isfinite(logps.grad).all()
    assert torch.equal(logps.grad[mask == 0], torch.zeros_like(logps.grad[mask == 0]))
    assert logps.grad[mask == 1].abs().sum() > 0


@pytest.mark.parametrize("level", IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_level_advantages_equal_broadcast_sequence_advantages(loss_type, level):
    logps, old, ref, mask, advantages = random_batch(1)
    kwargs = {"loss_type": loss_type, "beta": 0.04, "importance_sampling_level": level, "max_completion_length": 6}
    results = []
    for adv in (advantages, advantages.unsqueeze(1).expand(-1, 6)):
        leaf = logps.clone().requires_grad_()
        loss, parts = policy_loss(leaf, old, ref, adv, mask, **kwargs)
        loss.backward()
        results.append((loss, leaf.grad, parts))
    (loss_a, grad_a, parts_a), (loss_b, grad_b, parts_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    if level == "token":  # sequence-level clip metrics average over sequences or tokens depending on the shape
        for key in parts_a:
            torch.testing.assert_close(parts_a[key], parts_b[key])


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask) == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0], dtype=F64))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-12)])
def test_selective_log_softmax_matches_naive(dtype, atol):
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=generator) * 4).to(dtype)  # [N, T, V]
    index = torch.randint(0, 50, (3, 5), generator=generator)  # [N, T]
    reference = torch.log_softmax(logits.double(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)  # [N, T]
    result = selective_log_softmax(logits, index)
    assert result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(result.double(), reference, atol=atol, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-12)])
def test_entropy_from_logits_matches_naive(dtype, atol):
    logits = (torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)  # [N, T, V]
    probs = torch.softmax(logits.double(), dim=-1)  # [N, T, V]
    reference = -(probs * probs.log()).sum(-1)  # [N, T]
    result = entropy_from_logits(logits, chunk_size=4)
    assert result.shape == (3, 5) and result.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(result.double(), reference, atol=atol, rtol=0)


def test_entropy_ignores_minus_inf_logits():
    logits = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]], requires_grad=True)  # [1, 1, 4]
    entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy, torch.tensor([[math.log(2.0)]]))
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
