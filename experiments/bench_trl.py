"""TRL's GRPOTrainer set up as medvr's default GRPO, for `experiments/bench.py` (see bench_run.py).

Every number comes from the composed medvr config: TRL's options are set so that the algorithm is
medvr's (loss type, advantage scaling, k3 KL without TRL's bias correction, one on-policy update, raw
sampling with top_k=0 / top_p=1, no vLLM), the step holds the same prompts (medvr's training order,
unshuffled) in micro-batches of algo.micro_batch_size, and the reward is medvr's reward terms with
their weights. A setting TRL cannot express stops the run with the config key to change.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from transformers import AutoProcessor, TrainerCallback

from medvr.models.family import by_type, vision_tower
from medvr.models.spec import _auto_dtype
from medvr.rollout.encode import encode_prompts, record_images


class _StepClock(TrainerCallback):
    """Optimiser-step boundaries for the probe; a step's own logging (logging_steps=1) counts as part of it."""

    def __init__(self, probe):
        self.probe = probe

    def on_step_begin(self, args, state, control, **kwargs):
        self.probe.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.probe.step_end()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.probe.step_end()
        if logs and "reward" in logs:
            self.probe.rewards.append((self.probe.begins[-1] if self.probe.begins else 0.0, logs["reward"]))


def _term(name: str, fn):
    """A medvr reward term as a TRL reward function: TRL hands conversational completions as message lists."""

    def reward(completions, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return fn(texts, **columns)

    reward.__name__ = name
    return reward


def _unsupported(cfg) -> list[str]:
    algo, model = cfg.algo, cfg.model
    problems = {
        "algo.num_iterations": (algo.num_iterations != 1, "1 (TRL counts reused batches as extra steps)"),
        "algo.dynamic_sampling": (algo.dynamic_sampling, "false (TRL has no group filter)"),
        "algo.advantage_eps": (algo.advantage_eps != 1e-4, "1e-4 (TRL's fixed epsilon)"),
        "model.quantization": (model.get("quantization") is not None, "null"),
        "reward.credit": (cfg.reward.get("credit", "sequence") != "sequence", "sequence"),
    }
    return [f"{key} must be {want}" for key, (bad, want) in problems.items() if bad]


def _records(cfg, batches: int) -> list[dict]:
    """The records medvr's first `batches` training batches hold, in that order."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    records = []
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == batches:
            break
        records += batch
    return records


def build_trainer(job: dict, cfg, probe):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    problems = _unsupported(cfg)
    if problems:
        raise SystemExit("bench: TRL cannot run this config as medvr does: " + "; ".join(problems))
    algo, explore = cfg.algo, cfg.explore
    if explore.get("max_turns", 0):
        raise SystemExit("bench: TRL runs explore=none only (no zoom tool); drop explore= from the overrides")
    spec = instantiate(cfg.model)
    model_dir = spec.check()
    prompt, reward = instantiate(cfg.prompt), instantiate(cfg.reward)
    family = by_type(json.loads((Path(model_dir) / "config.json").read_text())["model_type"])
    processor = AutoProcessor.from_pretrained(model_dir, **family.processor_kwargs(spec.min_pixels, spec.max_pixels))
    processor.tokenizer.padding_side = "left"

    rows = cfg.data.batch_size * algo.group_size * algo.grad_accum  # completions per optimiser step
    micro = min(algo.micro_batch_size, rows)
    if rows % micro:
        raise SystemExit(f"bench: completions per step ({rows}) must be a multiple of algo.micro_batch_size ({micro})")
    records = _records(cfg, (job["warmup"] + job["steps"]) * algo.grad_accum)
    system = explore.get("system")

    def conversation(record):
        messages = prompt.messages(record, system=system)
        return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                 next(part["text"] for part in m["content"] if part["type"] == "text")} for m in messages]

    columns = ("question", "options", "answer", "answer_type", "modality")
    dataset = Dataset.from_list([
        {"prompt": conversation(r), "images": record_images(r), **{k: r.get(k) for k in columns}} for r in records])
    dtype = _auto_dtype(spec.dtype)
    generation_kwargs = {"min_new_tokens": explore.max_new_tokens} if job.get("force_tokens") else None
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-", dir=job["out_dir"]),
        max_steps=job["warmup"] + job["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,  # one generation of all the step's prompts, then micro-batches
        num_generations=algo.group_size,
        max_completion_length=explore.max_new_tokens,
        temperature=algo.temperature,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        generation_kwargs=generation_kwargs,
        beta=algo.beta,
        use_bias_correction_kl=False,
        loss_type=algo.loss_type,
        scale_rewards=algo.scale_rewards,
        epsilon=algo.epsilon_low,
        epsilon_high=algo.epsilon_high,
        importance_sampling_level=algo.importance_sampling_level,
        num_iterations=1,
        mask_truncated_completions=algo.mask_truncated_completions,
        top_entropy_quantile=algo.top_entropy_quantile,
        reward_weights=[reward.weights[name] for name in reward.names],
        use_vllm=False,
        learning_rate=cfg.optimizer.lr,
        weight_decay=cfg.optimizer.weight_decay,
        adam_beta1=cfg.optimizer.betas[0],
        adam_beta2=cfg.optimizer.betas[1],
        optim="adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=algo.max_grad_norm or 0.0,
        bf16=dtype == torch.bfloat16,
        model_init_kwargs={"dtype": dtype, "attn_implementation": spec.attn_implementation},
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        shuffle_dataset=False,
        seed=cfg.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=[_term(name, fn) for name, fn in reward.terms.items()],
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **spec.lora) if spec.uses_lora else None,
        callbacks=[_StepClock(probe)],
    )
    if spec.freeze_vision:  # before train(): the optimiser is built over the parameters that need gradients
        vision_tower(trainer.model).requires_grad_(False)
    _check_prompt(trainer, processor, prompt, records[0], system, dataset[0], prepare_multimodal_messages)
    generate = trainer._generate

    def timed_generate(prompts):
        start = probe.clock()
        out = generate(prompts)
        completion_ids = out[1]
        probe.generated(start, sum(len(ids) for ids in completion_ids), len(completion_ids))
        return out

    trainer._generate = timed_generate
    return trainer


def _check_prompt(trainer, processor, prompt, record, system, row, prepare) -> None:
    """TRL must see the very tokens medvr feeds the model for the same record; stop if it would not."""
    theirs = trainer._tokenize_prompts([prepare(row["prompt"], images=row["images"])])[0][0]
    enc = encode_prompts(processor, prompt, [record], 1, system=system)
    ours = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    if list(theirs) != ours:
        raise SystemExit(
            f"bench: TRL's prompt differs from medvr's ({len(theirs)} vs {len(ours)} tokens):\n"
            f"TRL:   {processor.tokenizer.decode(theirs)!r}\nmedvr: {processor.tokenizer.decode(ours)!r}")
