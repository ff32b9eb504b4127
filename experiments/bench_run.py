"""One engine of `experiments/bench.py`, in its own process: medvr's training loop or TRL's GRPOTrainer.

    python experiments/bench_run.py JOB.json        # bench.py writes JOB.json and reads JOB["result"]

Both engines compose the same medvr config (conf/train.yaml + the job's overrides), so model directory,
records (medvr's training order), prompt, G, prompts per step, token budget, beta, temperature, lr and
reward (medvr's own reward terms) are the same by construction. A step is one optimiser step; its time
runs from the start of the first timed step to the end of the last (logging and data loading between
steps included); model loading and the warm-up steps are left out. Generation time is medvr's
`explore.rollout` or TRL's `_generate` (prompt encoding, sampling, decoding), over the timed steps.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import medvr  # noqa: F401  (config resolvers)

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# what a benchmark run leaves out: evaluation, checkpoints, exported models, logged rollout pages
QUIET = [
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "validate_before_training=false",
    "test_after_training=false",
    *(f"callbacks.{name}=null" for name in
      ("model_checkpoint", "last_checkpoint", "rollout_samples", "reward_curve", "export_hf")),
]


def compose_config(overrides: list[str], out_dir: Path, steps: int, tracking_uri: str | None = None):
    """conf/train.yaml as `python train.py` composes it, with every output under `out_dir`."""
    store = [f"logger.tracking_uri={tracking_uri}"] if tracking_uri else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out_dir}", f"trainer.max_steps={steps}", *QUIET, *store,
                                          *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.run_dir = str(out_dir / "run")
    return cfg


class Probe:
    """Step boundaries, generation time and tokens, and memory per phase (load, steps) of this process.

    CPU memory is the kernel's resident-set high-water mark (VmHWM), reset when the first step starts
    (/proc/self/clear_refs), so the load phase and the steps each get their own peak. GPU memory is
    torch's allocator peak, reset at the same point.
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.started = time.perf_counter()
        self.begins: list[float] = []
        self.end = math.nan
        self.generations: list[tuple[float, float, int, int]] = []  # (start, seconds, tokens, rows)
        self.rewards: list[tuple[float, float]] = []  # (time, mean total reward of a batch)
        self.memory: dict[str, float] = {}

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step_begin(self) -> None:
        now = self.clock()
        if not self.begins:
            self._loaded(now)
        self.begins.append(now)

    def step_end(self) -> None:
        self.end = self.clock()
        # peaks as of the end of the latest step: what the run does after its last step is no part of them
        self.memory["step_peak_rss_mib"] = _proc_status().get("VmHWM", _maxrss_mib())
        if self.cuda:
            self.memory["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    def generated(self, start: float, tokens: int, rows: int) -> None:
        self.generations.append((start, self.clock() - start, tokens, rows))

    def _loaded(self, now: float) -> None:
        status = _proc_status()
        self.memory["load_s"] = now - self.started
        self.memory["loaded_rss_mib"] = status.get("VmRSS", math.nan)
        self.memory["load_peak_rss_mib"] = status.get("VmHWM", _maxrss_mib())
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the steps' own peak from here
            self.memory["hwm_reset"] = 1.0
        except OSError:
            self.memory["hwm_reset"] = 0.0  # VmHWM then still holds the load peak: step peak is an upper bound
        if self.cuda:
            self.memory["cuda_loaded_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()

    def result(self, warmup: int, group: int) -> dict:
        """Steady-state figures over the steps after `warmup` (`group` training batches per optimiser step)."""
        begins = self.begins[::group]
        steps = len(begins) - warmup
        if steps < 1:
            raise RuntimeError(f"only {len(begins)} steps ran; the benchmark needs more than {warmup} warm-up steps")
        t0 = begins[warmup]
        timed = [g for g in self.generations if g[0] >= t0]
        gen_s = sum(g[1] for g in timed)
        tokens = sum(g[2] for g in timed)
        rows = sum(g[3] for g in timed)
        out = {
            "steps": steps,
            "s_per_step": (self.end - t0) / steps,
            "gen_s_per_step": gen_s / steps,
            "tok_per_s": tokens / gen_s if gen_s > 0 else math.nan,
            "tokens_per_completion": tokens / rows if rows else math.nan,
            "reward": _mean([r for t, r in self.rewards if t >= t0]),
            **self.memory,
        }
        out["peak_rss_mib"] = max(out["load_peak_rss_mib"], out["step_peak_rss_mib"])
        out["step_rss_over_loaded_mib"] = out["step_peak_rss_mib"] - out["loaded_rss_mib"]
        if self.cuda:
            out["cuda_device"] = torch.cuda.get_device_name()
        return out


def _proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB (empty where /proc is missing)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def force_length() -> None:
    """medvr never stops before its token budget: its stop tokens become one that the policy may not sample."""
    import importlib
    import pkgutil

    from medvr.rollout import encode

    for package in ("medvr.rollout", "medvr.explore"):
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
            importlib.import_module(f"{package}.{info.name}")
    original = encode.stop_token_ids
    for name, module in list(sys.modules.items()):
        if name.startswith("medvr") and getattr(module, "stop_token_ids", None) is original:
            module.stop_token_ids = lambda processor: encode.vision_token_ids(processor)[:1]


def run_medvr(job: dict, cfg, probe: Probe) -> dict:
    """medvr's own `run(cfg)` (as train.py runs it), with each training step and rollout timed."""
    from medvr.module import GRPOModule
    from medvr.train import run

    if job.get("force_tokens"):
        force_length()
    training_step = GRPOModule.training_step

    def timed_step(module, batch, batch_idx):
        if "bench_rollout" not in vars(module.explore):
            _instrument(module, probe)
        probe.step_begin()
        training_step(module, batch, batch_idx)
        probe.step_end()

    GRPOModule.training_step = timed_step
    run(cfg)
    return probe.result(job["warmup"], cfg.algo.grad_accum)


def _instrument(module, probe: Probe) -> None:
    """Time the module's training rollouts (tokens: policy tokens kept) and keep each batch's mean reward."""
    explore, reward = module.explore, module.reward
    rollout, score = explore.rollout, reward.score

    def timed_rollout(*args, **kwargs):
        start = probe.clock()
        out = rollout(*args, **kwargs)
        if not kwargs.get("greedy"):
            probe.generated(start, int(out.loss_mask.sum()), len(out))
        return out

    def kept_score(completions, **columns):
        totals, terms = score(completions, **columns)
        probe.rewards.append((time.perf_counter(), _mean(totals)))
        return totals, terms

    explore.rollout = explore.bench_rollout = timed_rollout
    reward.score = kept_score


def run_trl(job: dict, cfg, probe: Probe) -> dict:
    """TRL's GRPOTrainer on the same model directory, records, prompt, reward and GRPO settings."""
    from bench_trl import build_trainer

    trainer = build_trainer(job, cfg, probe)
    trainer.train()
    return probe.result(job["warmup"], 1)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    probe = Probe()
    out_dir = Path(job["out_dir"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # medvr's runs go to the benchmark's throw-away sqlite store
    cfg = compose_config(job["overrides"], out_dir, job["warmup"] + job["steps"], job.get("tracking_uri"))
    result = (run_medvr if job["engine"] == "medvr" else run_trl)(job, cfg, probe)
    result["torch_threads"] = torch.get_num_threads()
    Path(job["result"]).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
