"""medvr against TRL's GRPOTrainer on identical settings, and the cost of each explore option.

    python experiments/bench.py                                     # CPU: the tiny model, the demo's settings
    python experiments/bench.py --rollout hf,cached --steps 20 --out outputs/bench.md
    python experiments/bench.py --explore none,evr data.batch_size=2   # trailing Hydra overrides reach every run
    python experiments/bench.py --gpu                               # random Qwen2-VL-2B / Qwen2.5-VL-7B shapes
    python experiments/bench.py --gpu --dry-run                     # the plan and the model shapes; runs nothing

Prints Markdown tables: per engine (medvr with each `rollout=` option, TRL) seconds per optimiser step
in the steady state, rollout tokens per second and peak memory; then, per rollout option, each
explore option's step time relative to explore=none. Every engine and option runs in a fresh process
(experiments/bench_run.py), so memory figures and caches do not mix. Figures taken while other work
shares the machine are not comparable with idle ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CPU_EXPLORE = "none,tool,evr,random_crop,evr+reward=cca"
# random weights rarely open a zoom themselves; random_crop (which writes its own box) exercises zooms in the
# few minutes a lent GPU allows (evr works too: the action grammar closes its forced `<zoom>[`; add it with
# --explore none,evr,random_crop)
GPU_EXPLORE = "none,random_crop"
GPU_SETTINGS = ["algo.group_size=8", "explore.max_new_tokens=256"]
# on a GPU, also HF generate with a static KV cache, whose decoding forward transformers compiles
GPU_ROLLOUT_EXTRA = "hf+rollout.cache=static"


@dataclass
class Job:
    label: str
    engine: str  # medvr | trl
    overrides: list[str]
    model: str
    rollout: str | None = None
    explore: str = "none"
    engines_row: bool = False  # a row of the engines table (explore=none, or whatever the overrides choose)
    explore_row: bool = False  # a row of the explore table
    result: dict = field(default_factory=dict)
    error: str | None = None


def rollout_options() -> list[str]:
    """Options of the `rollout` config group, hf (the reference path) first; none where the group does not exist."""
    names = sorted(p.stem for p in (ROOT / "conf" / "rollout").glob("*.yaml"))
    return sorted(names, key=lambda n: n != "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="timed optimiser steps per run (default 10, --gpu 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--rollout", help="medvr rollout options, comma-separated; `+` adds overrides to one, e.g. "
                                          "hf+rollout.cache=static (default: all of conf/rollout; --gpu adds "
                                          f"{GPU_ROLLOUT_EXTRA})")
    parser.add_argument("--explore", help=f"explore options to cost, comma-separated; `+` adds overrides to one, e.g. "
                                          f"evr+reward=cca (default {CPU_EXPLORE}; --gpu {GPU_EXPLORE}; '' for none)")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL out")
    parser.add_argument("--gpu", action="store_true", help="random-weight models of the published shapes, bf16, "
                                                           "G=8, 256 forced new tokens")
    parser.add_argument("--models", default="qwen2vl_2b,qwen25vl_7b", help="--gpu: which shapes (bench_models.py)")
    parser.add_argument("--shrink", action="store_true", help="--gpu path with cut-down shapes in fp32 (runs on CPU)")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and the runs, run nothing")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    parser.add_argument("--keep", type=Path, help="keep every run's log and result in this directory")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (as for train.py)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (5 if args.gpu else 10)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step pays for one-time set-up)")
    known = rollout_options()
    if args.rollout is None:
        args.rollout = known + ([GPU_ROLLOUT_EXTRA] if args.gpu and GPU_ROLLOUT_EXTRA.split("+")[0] in known else [])
    else:
        args.rollout = [r for r in args.rollout.split(",") if r]
    unknown = [r for r in args.rollout if r.split("+")[0] not in known]
    if unknown:
        parser.error(f"--rollout {unknown}: conf/rollout has {known or 'no options (the group does not exist)'}")
    explore = args.explore if args.explore is not None else (GPU_EXPLORE if args.gpu else CPU_EXPLORE)
    args.explore = [e for e in explore.split(",") if e]
    if args.shrink and not args.gpu:
        parser.error("--shrink only applies to --gpu")
    return args


def plan(args, models: dict[str, list[str]]) -> list[Job]:
    """The runs: per model, medvr per rollout option and TRL (engines table), then the explore options."""
    jobs: list[Job] = []
    rollouts = args.rollout or [None]
    chosen = any(o.startswith("explore=") for o in args.overrides)  # the engines table then runs that option
    for model, base in models.items():
        base = [*base, *args.overrides]
        medvr = {}
        for r in rollouts:
            route = _overrides("rollout", r)
            medvr[r] = Job(f"medvr-{r}" if r else "medvr", "medvr", [*base, *route], model, r, engines_row=True)
            jobs.append(medvr[r])
        if not args.no_trl:
            jobs.append(Job("trl", "trl", base, model, engines_row=True))
        for r in rollouts:
            route = _overrides("rollout", r)
            for item in args.explore:
                explore = _overrides("explore", item)
                if explore == ["explore=none"] and not chosen:  # the engines table's run already is this one
                    medvr[r].explore_row = True
                    continue
                jobs.append(Job(medvr[r].label, "medvr", [*base, *route, *explore], model, r,
                                item.replace("+", " "), explore_row=True))
    return jobs


def _overrides(group: str, item: str | None) -> list[str]:
    """Overrides of a --rollout/--explore item: `hf+rollout.cache=static` -> [rollout=hf, rollout.cache=static]."""
    if not item:
        return []
    option, *extra = item.split("+")
    return [f"{group}={option}", *extra]


def run_job(job: Job, args, work: Path, index: int) -> None:
    out = work / f"{index:02d}"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"engine": job.engine, "overrides": job.overrides, "warmup": args.warmup, "steps": args.steps,
            "force_tokens": args.gpu, "out_dir": str(out), "result": str(out / "result.json"),
            # one store for all runs: a new sqlite store's schema migration would be paid by every run
            "tracking_uri": f"sqlite:///{work.resolve()}/mlflow.db"}
    (out / "job.json").write_text(json.dumps(spec, indent=1))
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        code = subprocess.call([sys.executable, str(HERE / "bench_run.py"), str(out / "job.json")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code == 0:
        job.result = json.loads((out / "result.json").read_text())
    else:
        lines = [line for line in (out / "log.txt").read_text().splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"(\w+\.)*\w+(Error|Exception|Exit)\b|bench: ", line)]
        job.error = (errors or lines or [f"exit code {code}"])[-1][:300]
        print("\n".join(lines[-15:]), file=sys.stderr)
    print(f"bench: {job.model} {job.label} {job.explore}: {time.perf_counter() - start:.0f} s"
          f"{' FAILED: ' + job.error if job.error else ''}", file=sys.stderr, flush=True)


def prepare(args, keep_dir: Path) -> tuple[dict[str, list[str]], dict]:
    """Build what the runs load (tiny model, synthetic data; --gpu: the random models); return per-model overrides."""
    from bench_run import compose_config
    from hydra.utils import instantiate

    cfg = compose_config(args.overrides, keep_dir, 1)
    settings = {"tiny": None}
    if not args.gpu:
        if not args.dry_run:
            settings["tiny"] = instantiate(cfg.model).check()
            instantiate(cfg.data).setup("fit")
        return {cfg.model.name: []}, settings
    import bench_models

    tiny = instantiate(compose_config([*args.overrides, "model=tiny"], keep_dir, 1).model)
    tiny_dir = str(tiny.build_dir) if args.dry_run else tiny.check()
    tokens = bench_models.tiny_tokens(tiny_dir) if (Path(tiny_dir) / "config.json").is_file() else None
    models = {}
    dtype = "float32" if args.shrink else "bfloat16"
    for name in args.models.split(","):
        shape = bench_models.SHAPES[name]
        config = bench_models.config_for(name, tokens, args.shrink) if tokens or not args.shrink else None
        settings[name] = bench_models.param_count(config) if config else math.nan
        directory = "'<built at run time>'"
        if tokens:
            directory = bench_models.model_dir(name, tiny_dir, str(tiny.cache_dir), dtype, args.shrink)
        if not args.dry_run and not (directory / "config.json").is_file():
            print(f"bench: building random {name} in {directory}", file=sys.stderr, flush=True)
            subprocess.check_call([sys.executable, str(HERE / "bench_models.py"), name, tiny_dir, str(directory),
                                   dtype, *(["--shrink"] if args.shrink else [])], cwd=ROOT)
        models[name] = [f"model={shape['medvr_model']}", f"model.path={directory}", f"model.name={name}_random",
                        f"model.dtype={dtype}", *GPU_SETTINGS]
    return models, settings


def header(args, jobs: list[Job], models: dict[str, list[str]], settings: dict) -> list[str]:
    import torch
    import transformers
    from bench_run import compose_config

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed (pip install -e '.[dev]')"
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = [
        "# medvr benchmark" + (" (dry run)" if args.dry_run else ""), "",
        f"- machine: {os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}; GPU: {gpu}",
        (f"- versions: python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, trl {trl_version}, medvr {_git()}"),
    ]
    for model, base in models.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config([*base, *args.overrides], Path(tmp), 1)
        algo, reward = cfg.algo, cfg.reward
        params = settings.get(model)
        size = ""
        if isinstance(params, int):
            size = f", {params / 1e9:.2f}B" if params >= 1e9 else f", {params / 1e6:.1f}M"
            size += " parameters (random weights)"
        tokenizer = ", the tiny model's tokenizer and processor" if args.gpu else ""
        lora = f"r={cfg.model.lora.r}" if cfg.model.lora else "no"
        terms = " + ".join(f"{w:g}×{n}" for n, w in reward.weights.items())
        lines += [
            (f"- model `{model}`{size}: {cfg.model.dtype}, LoRA {lora}, gradient checkpointing "
             f"{cfg.model.gradient_checkpointing}, pixels {cfg.model.min_pixels}-{cfg.model.max_pixels}{tokenizer}"),
            (f"- settings: data `{cfg.data.source._target_.rsplit('.', 1)[-1]}`, G={algo.group_size}, "
            f"{cfg.data.batch_size} prompts/step ({cfg.data.batch_size * algo.group_size * algo.grad_accum} "
            f"completions, grad_accum {algo.grad_accum}, micro-batch {algo.micro_batch_size}), max new tokens "
            f"{cfg.explore.max_new_tokens}, temperature {algo.temperature} (top_k 0, top_p 1), beta {algo.beta}, "
            f"lr {cfg.optimizer.lr:g}, loss {algo.loss_type}, scale_rewards {algo.scale_rewards}, reward {terms}"),
        ]
    stop = ("forced: every completion is exactly max new tokens long (random weights rarely stop); medvr's stop "
            "tokens are replaced by a token it may not sample, TRL gets generation_kwargs min_new_tokens")
    lines += [
        (f"- steps: {args.warmup} warm-up + {args.steps} timed optimiser steps per run; overrides: "
        f"{' '.join(args.overrides) or 'none'}"),
        f"- stopping: {stop if args.gpu else 'natural (EOS or the budget): completion lengths differ by engine'}",
    ]
    if args.dry_run:
        lines += ["", "| tables | run | explore | overrides |", "|---|---|---|---|"]
        lines += [f"| {' + '.join(n for n, on in (('engines', j.engines_row), ('explore', j.explore_row)) if on)} | "
                  f"{j.label} | {j.explore} | "
                  f"`{' '.join(j.overrides)}` |" for j in jobs]
    return lines


def tables(args, jobs: list[Job]) -> list[str]:
    lines = []
    cuda = any("cuda_peak_gib" in j.result for j in jobs)
    gpu_cols = " GPU loaded (GiB) | GPU step peak (GiB) |" if cuda else ""
    for model in dict.fromkeys(j.model for j in jobs):
        engines = [j for j in jobs if j.model == model and j.engines_row]
        trl = next((j.result["s_per_step"] for j in engines if j.engine == "trl" and not j.error), math.nan)
        chosen = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("explore=")), "none")
        lines += ["", f"## {model}: engines (explore={chosen})", "",
                  ("| engine | s/step | s/step ÷ TRL's | rollout s/step | rollout tok/s | tokens/completion | reward | "
                  f"peak RSS (MiB) | steps: RSS over loaded (MiB) |{gpu_cols}"),
                  "|---|" + "---:|" * (8 + 2 * cuda)]
        for j in engines:
            r = j.result
            if j.error:
                lines.append(_row(j, []))
                continue
            cells = [_f(r["s_per_step"]), _f(r["s_per_step"] / trl, 2), _f(r["gen_s_per_step"]),
                     _f(r["tok_per_s"], 1), _f(r["tokens_per_completion"], 1), _f(r["reward"], 2),
                     _f(r["peak_rss_mib"], 0), _f(r["step_rss_over_loaded_mib"], 0)]
            if cuda:
                cells += [_f(r.get("cuda_loaded_gib", math.nan), 2), _f(r.get("cuda_peak_gib", math.nan), 2)]
            lines.append(_row(j, cells))
        explore = [j for j in jobs if j.model == model and j.explore_row]
        if not explore:
            continue
        lines += ["", f"## {model}: explore options (medvr)", "",
                  ("| rollout | explore | s/step | s/step ÷ none's | per policy token ÷ none's | rollout s/step | "
                  "rollout tok/s | tokens/trajectory | peak RSS (MiB) |"), "|---|---|" + "---:|" * 7]
        for j in explore:
            r = j.result
            if j.error:
                lines.append(_row(j, [], f"{j.rollout or '-'} | {j.explore}"))
                continue
            base = next((b.result for b in explore
                         if b.rollout == j.rollout and b.explore == "none" and not b.error), {})
            ratio = r["s_per_step"] / base.get("s_per_step", math.nan)
            # the same ratio per policy token: what a zooming step costs beyond its longer trajectories
            per_token = ratio / (r["tokens_per_completion"] / base.get("tokens_per_completion", math.nan))
            cells = [_f(r["s_per_step"]), _f(ratio, 2), _f(per_token, 2), _f(r["gen_s_per_step"]),
                     _f(r["tok_per_s"], 1), _f(r["tokens_per_completion"], 1), _f(r["peak_rss_mib"], 0)]
            lines.append(_row(j, cells, f"{j.rollout or '-'} | {j.explore}"))
    lines += [
        "",
        ("s/step: wall time per optimiser step from the start of the first timed step to the end of the last (data "
        "loading and per-step logging included: medvr logs to a throw-away sqlite MLflow store, TRL to memory); "
        "rollout s/step: of that, time in generation (medvr `explore.rollout`, TRL `_generate`: prompt encoding, "
        "sampling, decoding); rollout tok/s: completion tokens (medvr: policy tokens kept; TRL: ids up to EOS) / "
        "generation time; reward: mean total reward of the timed steps; per policy token ÷ none's: s/step ÷ none's "
        "divided by the ratio of their tokens/trajectory (a zooming trajectory holds about twice the policy tokens, "
        "a second turn and a second image). Peak RSS: the process's resident-set "
        "high-water mark (load and steps); steps: RSS over loaded = the steps' high-water mark minus the RSS when "
        "the first step started (optimiser states, activations, caches). GPU: torch's allocated bytes."),
    ]
    return lines


def _row(job: Job, cells: list[str], first: str | None = None) -> str:
    first = first or job.label
    if job.error:
        return f"| {first} | failed: {job.error.replace('|', '/')} |"
    return f"| {first} | " + " | ".join(cells) + " |"


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git() -> str:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "(no git)"
    return commit + (" + uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MEDVR_CACHE", str(ROOT / "outputs" / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory(prefix="medvr-bench-") as tmp:
        work = args.keep or Path(tmp)
        models, settings = prepare(args, work / "prepare")
        jobs = plan(args, models)
        if not args.dry_run:
            for i, job in enumerate(jobs):
                run_job(job, args, work, i)
        text = "\n".join(header(args, jobs, models, settings) + ([] if args.dry_run else tables(args, jobs)))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 1 if any(j.error for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
