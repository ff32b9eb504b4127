"""When to force a zoom: first_over, the entropy trigger's three threshold modes, the random control's statistics."""

import math

import pytest
import torch
from torch.distributions import Categorical

from medvr.explore.triggers import EntropyTrigger, RandomTrigger, first_over, window_open
from medvr.rollout.sampling import Noise

V = 1024  # log 64 / log 1024 = 0.6 exactly, log 32 / log 1024 = 0.5, log 128 / log 1024 = 0.7


def spread(k: int, vocab: int = V) -> torch.Tensor:
    """Logits of a distribution uniform over `k` of `vocab` tokens: entropy log k."""
    logits = torch.full((vocab,), -math.inf)
    logits[:k] = 0.0
    return logits


def peaked(vocab: int = V) -> torch.Tensor:
    logits = torch.zeros(vocab)
    logits[0] = 30.0
    return logits


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[N, L, V] logits -> [N, L] entropies in nats."""
    return Categorical(logits=logits).entropy()


def entropy_trigger(mode="absolute", threshold=1.0, min_tokens=0, max_triggers=1) -> EntropyTrigger:
    return EntropyTrigger(
        mode=mode, threshold=threshold, min_tokens=min_tokens, max_triggers=max_triggers, branch=False
    )


def random_trigger(rate=0.5, min_frac=0.2, max_frac=0.6, span=16) -> RandomTrigger:
    return RandomTrigger(
        rate=rate, min_tokens=0, max_triggers=1, min_frac=min_frac, max_frac=max_frac, branch=False, span=span
    )


def test_hand_made_entropies():
    h = entropy(torch.stack([spread(V), spread(64), spread(1), peaked()]).unsqueeze(0))  # [1, 4]
    assert h[0].tolist() == pytest.approx([math.log(V), 0.6 * math.log(V), 0.0, 0.0], abs=1e-5)


# ---- first_over ---------------------------------------------------------------------------------


def test_first_over_first_allowed_position_per_row():
    entropies = torch.tensor(
        [
            [0.1, 2.0, 0.3, 3.0, 0.2],  # first over at 1
            [0.1, 0.2, 0.3, 0.4, 1.0],  # exactly the threshold at the last position
            [0.1, 0.2, 0.3, 0.4, 0.5],  # never over
            [5.0, 5.0, 0.0, 5.0, 5.0],  # over at 0, but 0..1 are masked off (min_tokens = 2)
            [5.0, 5.0, 5.0, 5.0, 5.0],  # over everywhere, nothing allowed
        ]
    )
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[3, :2] = False
    allowed[4] = False
    assert first_over(entropies, allowed, 1.0).tolist() == [1, 4, -1, 3, -1]
    assert first_over(entropies, allowed, torch.tensor(1.0)).tolist() == [1, 4, -1, 3, -1]
    assert first_over(entropies, allowed, 2.5).tolist() == [3, -1, -1, 3, -1]
    assert first_over(entropies, allowed, 10.0).tolist() == [-1, -1, -1, -1, -1]


def test_first_over_respects_holes_in_the_mask():
    entropies = torch.tensor([[3.0, 3.0, 3.0, 0.0, 3.0, 3.0]])
    allowed = torch.tensor([[False, False, False, True, False, True]])  # e.g. reasoning ended, then a new turn
    assert first_over(entropies, allowed, 1.0).tolist() == [5]
    assert first_over(entropies, allowed, 0.0).tolist() == [3]


# ---- EntropyTrigger -----------------------------------------------------------------------------


def rows_of(*rows: list[torch.Tensor]) -> torch.Tensor:
    return entropy(torch.stack([torch.stack(row) for row in rows]))  # [N, L]


def test_entropy_absolute_threshold_in_nats():
    # log 64 = 4.159 nats at position 2, log 1024 = 6.93 nats at position 3
    h = rows_of([peaked(), spread(2), spread(64), spread(V)], [spread(64), peaked(), peaked(), peaked()])
    allowed = torch.ones_like(h, dtype=torch.bool)
    assert entropy_trigger("absolute", 4.0).positions(h, allowed, V).tolist() == [2, 0]
    assert entropy_trigger("absolute", 4.3).positions(h, allowed, V).tolist() == [3, -1]
    assert entropy_trigger("absolute", 0.5).positions(h, allowed, V).tolist() == [1, 0]  # log 2 = 0.69
    assert entropy_trigger("absolute", 7.0).positions(h, allowed, V).tolist() == [-1, -1]
    # nats do not depend on the vocabulary
    assert entropy_trigger("absolute", 4.0).positions(h, allowed, 2 * V).tolist() == [2, 0]


def test_entropy_normalized_threshold_is_a_fraction_of_log_vocab():
    h = rows_of([peaked(), spread(2), spread(64), spread(V)], [spread(64), peaked(), peaked(), peaked()])
    allowed = torch.ones_like(h, dtype=torch.bool)
    assert entropy_trigger("normalized", 0.5).watch(torch.arange(2), Noise(2, 1), V).threshold() == pytest.approx(
        0.5 * math.log(V)
    )
    # position 2 has 0.6 log V: it fires at 0.5, not at 0.7
    assert entropy_trigger("normalized", 0.5).positions(h, allowed, V).tolist() == [2, 0]
    assert entropy_trigger("normalized", 0.7).positions(h, allowed, V).tolist() == [3, -1]
    # the same entropies against a larger vocabulary are a smaller fraction: 0.6 log 1024 < 0.5 log 2^13
    assert entropy_trigger("normalized", 0.5).positions(h, allowed, 2**13).tolist() == [3, -1]


def test_entropy_quantile_is_over_the_allowed_entropies_seen_so_far():
    """Causal: the threshold at step t is the quantile of the batch's allowed entropies at steps <= t."""
    h = torch.tensor(
        [
            [9.0, 9.0, 1.0, 2.0, 3.0],
            [9.0, 9.0, 4.0, 5.0, 0.5],
        ]
    )
    allowed = torch.ones_like(h, dtype=torch.bool)
    allowed[:, :2] = False  # min_tokens = 2: the high entropies of the first tokens must not count
    # step 2 sees {1, 4}: median 2.5, row 1 fires (4 >= 2.5); step 3 sees {1, 4, 2} (row 1 is cut): median 2,
    # row 0 fires (2 >= 2). With the masked 9s counted, the median at step 2 would be 6.5 and nothing would fire.
    assert entropy_trigger("quantile", 0.5).positions(h, allowed, V).tolist() == [3, 2]
    # a high quantile: step 2 {1, 4} -> 3.7, row 1 fires; then {1, 4, 2} -> 3.6, {1, 4, 2, 3} -> 3.7: row 0 never
    assert entropy_trigger("quantile", 0.9).positions(h, allowed, V).tolist() == [-1, 2]


def test_entropy_quantile_watch_steps_match_the_replay():
    torch.manual_seed(0)
    h = torch.rand(6, 12) * 3
    allowed = torch.rand(6, 12) > 0.3
    trigger = entropy_trigger("quantile", 0.8)
    cut = trigger.positions(h, allowed, V)
    watch = trigger.watch(torch.arange(6), Noise(6, 1), V)
    expected = torch.full((6,), -1)
    for t in range(12):  # the decoder's view: one step at a time, cut rows leave
        live = (expected < 0).nonzero().squeeze(1)
        fire = watch.step(live, h[live, t], allowed[live, t])
        expected[live[fire]] = t
        seen = torch.cat(watch.seen)
        assert (seen <= 3).all() and len(seen) == int(sum(allowed[(cut < 0) | (cut >= s), s].sum() for s in range(t + 1)))
    assert torch.equal(cut, expected)
    assert ((cut >= 0) & ~allowed[torch.arange(6), cut.clamp(min=0)]).sum() == 0  # only where allowed


def test_entropy_ties_at_the_threshold_fire_whatever_the_float_noise():
    """The G copies of a prompt have equal entropies up to 1e-6 noise: all of them reach a threshold equal to it."""
    h = torch.tensor([[2.0], [2.0 - 1e-6], [2.0 + 1e-6], [1.9]])
    allowed = torch.ones_like(h, dtype=torch.bool)
    assert entropy_trigger("absolute", 2.0).positions(h, allowed, V).tolist() == [0, 0, 0, -1]


@pytest.mark.parametrize(("mode", "threshold"), [("absolute", 0.0), ("normalized", 0.1), ("quantile", 0.5)])
def test_entropy_nothing_allowed_never_fires(mode, threshold):
    h = torch.rand(3, 6) * 5
    allowed = torch.zeros(3, 6, dtype=torch.bool)
    assert entropy_trigger(mode, threshold).positions(h, allowed, V).tolist() == [-1, -1, -1]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mode": "entropy"}, "explore.trigger.mode"),
        ({"mode": "Absolute"}, "explore.trigger.mode"),
        ({"mode": "quantile", "threshold": 1.5}, "explore.trigger.threshold"),
        ({"mode": "quantile", "threshold": 0.0}, "explore.trigger.threshold"),
        ({"mode": "quantile", "threshold": 1.0}, "explore.trigger.threshold"),
        ({"mode": "normalized", "threshold": 2.0}, "explore.trigger.threshold"),
        ({"max_triggers": 0}, "max_triggers"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_entropy_trigger_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        entropy_trigger(**kwargs)


def test_entropy_absolute_threshold_is_not_a_fraction():
    assert entropy_trigger("absolute", 3.5).threshold == 3.5  # nats, any value


# ---- RandomTrigger ------------------------------------------------------------------------------

N, L = 20000, 16
ALLOWED_POSITIONS = [2, 3, 7, 8, 9, 14]  # holes: the k-th allowed step, not the k-th step


def random_mask() -> torch.Tensor:
    """[N, L]: three quarters of the rows allow ALLOWED_POSITIONS, a quarter allow nothing."""
    allowed = torch.zeros(N, L, dtype=torch.bool)
    allowed[:, ALLOWED_POSITIONS] = True
    allowed[3::4] = False
    return allowed


def test_random_fire_rate_and_uniform_positions():
    """span = the row's allowed steps: fires with probability `rate`, uniformly over the allowed steps."""
    torch.manual_seed(0)
    allowed, rate = random_mask(), 0.3
    pos = random_trigger(rate, span=len(ALLOWED_POSITIONS)).positions(torch.zeros(N, L), allowed, V)  # [N]
    assert pos.shape == (N,)
    has = allowed.any(dim=1)
    fired = pos >= 0
    assert not fired[~has].any()  # rows with nothing allowed never fire
    assert fired[has].float().mean().item() == pytest.approx(rate, abs=0.01)
    assert allowed[fired.nonzero().squeeze(1), pos[fired]].all()  # never outside the allowed positions
    counts = torch.bincount(pos[fired], minlength=L)[ALLOWED_POSITIONS].float()
    assert counts.sum() == fired.sum()
    expected = counts.sum() / len(ALLOWED_POSITIONS)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    assert (counts / counts.sum() - 1 / len(ALLOWED_POSITIONS)).abs().max() < 0.02


def test_random_rows_whose_window_closes_before_their_step_do_not_fire():
    """Causal: a row drawn to fire at its 8th allowed step never fires if it allows only 4."""
    torch.manual_seed(1)
    allowed = torch.zeros(N, L, dtype=torch.bool)
    allowed[0::2, 8:] = True  # 8 allowed steps, as after min_tokens = 8
    allowed[1::2, 0:4] = True  # 4 allowed steps, as when the reasoning ends at token 4
    pos = random_trigger(1.0, span=8).positions(torch.zeros(N, L), allowed, V)
    even, odd = pos[0::2], pos[1::2]
    assert ((even >= 8) & (even < 16)).all()  # all fire, uniformly over their 8 steps
    assert (torch.bincount(even - 8, minlength=8).float() / even.numel() - 1 / 8).abs().max() < 0.02
    fired = odd >= 0
    assert fired.float().mean().item() == pytest.approx(0.5, abs=0.02)  # targets 0..3 of 0..7
    assert (torch.bincount(odd[fired], minlength=4).float() / fired.sum() - 1 / 4).abs().max() < 0.02


def test_random_rate_zero_and_one():
    allowed = random_mask()
    has = allowed.any(dim=1)
    torch.manual_seed(2)
    assert (random_trigger(0.0).positions(torch.zeros(N, L), allowed, V) == -1).all()
    pos = random_trigger(1.0, span=1).positions(torch.zeros(N, L), allowed, V)
    assert (pos[has] == ALLOWED_POSITIONS[0]).all() and (pos[~has] == -1).all()


def test_random_ignores_entropies_and_draws_from_the_rollout_noise():
    allowed, noisy = random_mask()[:1000], torch.rand(1000, L) * 10
    noise = Noise(1000, 1, seed=3)
    a = random_trigger(0.5).positions(torch.zeros(1000, L), allowed, V, noise=noise)
    b = random_trigger(0.5).positions(noisy, allowed, V, noise=noise)
    assert torch.equal(a, b)
    c = random_trigger(0.5).positions(noisy, allowed, V, noise=Noise(1000, 1, seed=4))
    assert not torch.equal(a, c)


def test_random_box_inside_image_with_sides_in_range():
    torch.manual_seed(4)
    width, height, min_frac, max_frac = 640, 320, 0.2, 0.6
    trigger = random_trigger(min_frac=min_frac, max_frac=max_frac)
    boxes = torch.tensor([trigger.box(width, height) for _ in range(4000)], dtype=torch.float64)  # [B, 4]
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= width).all() and (y2 <= height).all()
    fw, fh = (x2 - x1) / width, (y2 - y1) / height
    assert (fw >= min_frac - 1 / width).all() and (fw <= max_frac + 1 / width).all()
    assert (fh >= min_frac - 1 / height).all() and (fh <= max_frac + 1 / height).all()
    # side fractions spread over the range, not stuck at one end
    assert fw.mean().item() == pytest.approx((min_frac + max_frac) / 2, abs=0.01)
    assert fh.mean().item() == pytest.approx((min_frac + max_frac) / 2, abs=0.01)
    assert fw.min().item() < min_frac + 0.02 and fw.max().item() > max_frac - 0.02
    # placed uniformly: centres average to the image centre, and boxes reach every edge
    assert ((x1 + x2) / 2).mean().item() == pytest.approx(width / 2, abs=0.01 * width)
    assert ((y1 + y2) / 2).mean().item() == pytest.approx(height / 2, abs=0.01 * height)
    assert x1.min() == 0 and y1.min() == 0 and x2.max() == width and y2.max() == height


def test_random_box_full_frac_is_the_whole_image():
    torch.manual_seed(5)
    trigger = random_trigger(min_frac=1.0, max_frac=1.0)
    assert {trigger.box(300, 200) for _ in range(20)} == {(0, 0, 300, 200)}


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"rate": 1.5}, "explore.trigger.rate"),
        ({"rate": -0.1}, "explore.trigger.rate"),
        ({"min_frac": 0.0}, "min_frac"),
        ({"min_frac": 0.7, "max_frac": 0.6}, "min_frac"),
        ({"max_frac": 1.2}, "max_frac"),
        ({"span": 0}, "explore.trigger.span"),
    ],
)
def test_random_trigger_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        random_trigger(**kwargs)


@pytest.mark.parametrize(
    ("text", "is_open"),
    [
        ("", True),
        ("<think>The lesion is", True),
        ("<think>x</think>", False),  # the reasoning ended
        ("<think>x</th", False),  # inside a closing tag: never cut a tag in two
        ("<think>x<", False),
        ("<think>x<answer>A", False),
        ("<think>x<zoom>[1, 2", False),  # the model is acting
        ("<think>x < y", True),  # a '<' that no longer starts a tag
    ],
)
def test_window_open(text, is_open):
    assert window_open(text) is is_open
