"""trainer=ddp: a 2-rank step (gloo, CPU) equals a 1-process step over the same prompts and completions.

Sampling is taken out: the 1-process step records its rollouts, and the 2-rank run replays each prompt's
rows, so both steps see identical completions; loss, reward and every gradient must agree to 1e-5.
Run as a script (`python tests/test_ddp.py WORLD LOSS_TYPE DIR CACHE`), it is one such step: Lightning's
DDP launcher re-runs the script for rank 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FAST_MODEL, SMALL_DATA, compose_cfg  # noqa: E402

from medvr.data.sampler import EpochShuffle  # noqa: E402
from medvr.distributed import close_process_group  # noqa: E402
from medvr.rollout.batch import Rollouts  # noqa: E402

PROMPTS = 4  # per global batch: 2 per rank


def _cat(parts: list[Rollouts]) -> Rollouts:
    """Row blocks (same padded length) stacked into one batch."""
    tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Rollouts)
               if isinstance(getattr(parts[0], f.name), torch.Tensor)}
    extras = {k: [v for p in parts for v in p.extras[k]] for k in parts[0].extras}
    completions = [c for p in parts for c in p.completions]
    return Rollouts(**tensors, completions=completions, group_size=parts[0].group_size, extras=extras)


class Replay:
    """Explore that samples once (recording the rollouts to `path`), then returns each prompt's recorded rows."""

    def __init__(self, explore, path: Path):
        self.explore = explore
        self.path = path
        self.max_new_tokens = explore.max_new_tokens

    def rollout(self, policy, processor, prompt, batch, *, group_size: int, temperature: float) -> Rollouts:
        if not self.path.exists():
            rollouts = self.explore.rollout(policy, processor, prompt, batch, group_size=group_size,
                                            temperature=temperature)
            torch.save({"ids": [r["id"] for r in batch], "rollouts": rollouts}, self.path)
        saved = torch.load(self.path, weights_only=False)
        rows = {i: saved["rollouts"].rows(k * group_size, (k + 1) * group_size) for k, i in enumerate(saved["ids"])}
        return _cat([rows[r["id"]] for r in batch])

    def stats(self, rollouts: Rollouts) -> dict[str, float]:
        return self.explore.stats(rollouts)


class Capture(L.Callback):
    """Rank 0's gradients (DDP-averaged) just before the update, and the train metrics the module logs."""

    def __init__(self, out: Path):
        self.out = out
        self.metrics: dict[str, float] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, module) -> None:
        module._log_at_step = self.metrics.update

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in module.policy.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank == 0:
            torch.save({"grads": self.grads, "metrics": self.metrics}, self.out)


def step(world: int, loss_type: str, where: Path, cache: Path) -> None:
    """One GRPO step on PROMPTS prompts over `world` CPU processes; rank 0 writes where/step{world}.pt."""
    overrides = [*FAST_MODEL, *SMALL_DATA, f"data.batch_size={PROMPTS // world}", f"algo.loss_type={loss_type}",
                 "algo.max_grad_norm=null", "algo.micro_batch_size=4", "explore.max_new_tokens=16"]
    cfg = compose_cfg(overrides, where / f"run{world}", cache)
    parts = {name: instantiate(cfg[name]) for name in ("algo", "reward", "prompt", "explore", "optimizer")}
    parts["explore"] = Replay(parts["explore"], where / "rollouts.pt")
    module = parts["algo"].module_class(model=instantiate(cfg.model), **parts)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=1,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Capture(where / f"step{world}.pt")],
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=datamodule)


@pytest.mark.slow
# grpo weighs ranks by rows, dapo by active tokens (bnpo shares dapo's rank weight: medvr/distributed.py)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_ranks_equal_one_process(loss_type, tiny, cache_dir, tmp_path):
    step(1, loss_type, tmp_path, cache_dir)  # samples and records the rollouts
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "2", loss_type, str(tmp_path), str(cache_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = torch.load(tmp_path / "step1.pt"), torch.load(tmp_path / "step2.pt")
    for key in ("train/loss", "train/reward", "train/completion_length"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-5), key
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 0
    assert max(g.abs().max().item() for g in one["grads"].values()) > 1e-4  # a real gradient, not all zero
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=0, msg=name)


def test_ranks_deal_out_disjoint_prompts_and_resume():
    """Rank r takes positions r, r + W, ... of the epoch's order; a resumed epoch continues at the global offset."""
    whole = EpochShuffle(10, seed=3).order(0)
    ranks = [list(EpochShuffle(10, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert ranks == [whole[0::2], whole[1::2]]
    resumed = EpochShuffle(10, seed=3, rank=1, world_size=2)
    resumed.start(0, 4)  # 2 steps of 1 prompt per rank done
    assert list(resumed) == whole[5::2] and len(resumed) == 5


if __name__ == "__main__":
    step(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    close_process_group()
