"""Build the tiny Qwen2-VL: tokenizer, processor, random init, vision pretraining, a supervised warm start.

Stage 1 (medvr/models/tiny_vision.py) teaches the vision tower alone to see. Stage 2, with that
tower frozen, teaches `<think>{rationale}</think><answer>{letter}</answer>` on synthetic items of a
split that training and evaluation never see; it reads the modality but not the lesion's location
or fine detail at the whole-image budget, leaving GRPO and zooming something to improve. Under the zoom system prompt
some items also demonstrate the zoom tool (a jittered box around the lesion, the crop observed,
then the rationale), so the zooming explore options start from a policy that can write a box.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from medvr.data import synthetic
from medvr.explore.trajectory import Trajectory, assemble
from medvr.explore.zoom import ZoomEnv
from medvr.models.tiny_tokenizer import train_tokenizer
from medvr.models.tiny_vision import jittered_box, pretrain_vision, views
from medvr.prompts import PromptBuilder
from medvr.rollout.encode import encode_prompts
from medvr.rollout.images import encode_unique

log = logging.getLogger(__name__)
ZOOM_PREAMBLE = "Let me look closer."  # how a zoom demonstration's think turn starts


def build_tiny(out_dir: Path, params: dict, prompt: PromptBuilder) -> None:
    torch.manual_seed(params["seed"])
    ws = params["warm_start"]
    workers = synthetic.pool_workers()  # drawing the synthetic images is a third of the build on 2 cores
    items = synthetic.generate(ws["items"], seed=params["seed"], split="warmstart", workers=workers)
    texts = synthetic.corpus_texts(ws["items"], seed=params["seed"])
    texts += [prompt.text(it.record["question"], it.record["options"]) for it in items[:200]]
    texts += _tool_texts(prompt, round(200 * ws["zoom"]["fraction"]))
    tokenizer = train_tokenizer(texts, params["vocab_size"])
    min_pixels, max_pixels = params["pixels"]
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    model = Qwen2VLForConditionalGeneration(_config(tokenizer, params))
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    env = _zoom_env(processor, prompt, ws, params)
    vp = params["vision_pretraining"]
    if vp["steps"] > 0:  # on a pool of its own: the tower sees many more images than the warm start has
        seen = synthetic.generate(vp["items"], seed=params["seed"], split="visionpretraining", workers=workers)
        data = views(seen, processor, env, ws["zoom"]["jitter"], random.Random(params["seed"]))
        pretrain_vision(model, data, vp["steps"], vp["batch_size"], vp["lr"], params["seed"])
    tower = list(model.model.visual.parameters())
    for p in tower if vp["steps"] > 0 else []:  # a pretrained tower stays as it is: stage 2 trains the rest
        p.requires_grad_(False)
    _warm_start(model, processor, prompt, items, ws, env)
    for p in tower:
        p.requires_grad_(True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _tool_texts(prompt: PromptBuilder, copies: int) -> list[str]:
    """The zoom tool's texts (its system prompt, the demonstrations' preamble, both observations), `copies`
    times each, for the tokenizer: as often as the zoom demonstrations hold them, so BPE learns their words.
    Without them the 48-word tool prompt took 153 tokens, mostly single letters (72 with them)."""
    invalid = prompt.invalid_observation.format(error="box [3, 4, 2, 8] lies outside the image (0..10)")
    return [prompt.zoom_system, ZOOM_PREAMBLE, prompt.observation, invalid] * copies


def _config(tokenizer, params: dict) -> Qwen2VLConfig:
    text, vision = params["text"], params["vision"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    t = head_dim // 2 // 4  # M-RoPE sections (temporal, height, width) as in Qwen2-VL: 1/4, 3/8, 3/8
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [t, (head_dim // 2 - t) // 2, head_dim // 2 - t - (head_dim // 2 - t) // 2],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**vision, "hidden_size": text["hidden_size"], "patch_size": 14, "spatial_merge_size": 2},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def _demonstration(item, prompt: PromptBuilder, processor, env: ZoomEnv | None, zoom: dict, rng) -> Trajectory:
    """One teacher trajectory: prompt, then the answer turn, optionally with a zoom onto the lesion first."""
    record = item.record
    system = prompt.zoom_system if env is not None else None
    enc = encode_prompts(processor, prompt, [record], repeat=1, system=system)
    traj = Trajectory.from_prompts(enc, [record])[0]
    answer = f"{item.rationale}</think><answer>{record['answer']}</answer><|im_end|>"
    tok = processor.tokenizer

    def policy(s: str) -> None:
        ids = torch.tensor(tok(s, add_special_tokens=False)["input_ids"])
        traj.add(ids, torch.zeros_like(ids), loss=1)

    if env is None or rng.random() >= zoom['rate']:
        policy("<think>" + answer)
        return traj
    box = jittered_box(record, env, zoom["jitter"], rng)
    action = f"<zoom>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</zoom>"
    policy(f"<think>{ZOOM_PREAMBLE}{action}")
    obs = env.step(action, record["image"])
    enc = processor(text=[obs.text], images=[obs.image], return_tensors="pt")
    traj.add_observation(enc["input_ids"][0], enc["mm_token_type_ids"][0], (enc["pixel_values"], enc["image_grid_thw"][0]), obs.image)
    policy(answer)
    return traj


def _zoom_env(processor, prompt: PromptBuilder, ws: dict, params: dict) -> ZoomEnv:
    return ZoomEnv(
        box_scale=params["box_scale"],
        min_side=ws["zoom"]["min_side"],
        upscale=ws["zoom"]["upscale"],
        min_pixels=params["pixels"][0],
        max_pixels=params["pixels"][1],
        image_factor=processor.image_processor.patch_size * processor.image_processor.merge_size,
        observation=prompt.observation,
        invalid_observation=prompt.invalid_observation,
    )


def _batches(demos: list[Trajectory], batch_size: int, pad_id: int, answer_id: int, answer_weight: float) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs, per-token loss weights) per batch. A policy token weighs 1, the answer letter (the
    token after `answer_id`) `answer_weight`, every other token 0. Demonstrations with a second image
    (zooms, twice as long) get batches of their own: no row pads to their length."""
    batches = []
    for group in ([d for d in demos if len(d.grids) == 1], [d for d in demos if len(d.grids) > 1]):
        for start in range(0, len(group), batch_size):
            batch = assemble(group[start : start + batch_size], pad_id, 1, "cpu")
            weights = batch.loss_mask.float()
            weights[:, 1:] *= torch.where(batch.input_ids[:, :-1] == answer_id, answer_weight, 1.0)
            batches.append((batch.model_inputs(), weights))
    random.Random(1).shuffle(batches)
    return batches


def _fit(model, batches: list, steps: int, lr: float, stage: str) -> None:
    """Weighted teacher-forced cross-entropy over `batches` (cycled) for `steps` AdamW steps, warm-up then cosine.

    Logits are computed only where a token carries loss weight (the answer turns): over a prompt of
    ~150 tokens the output layer would otherwise be a sixth of the step for nothing. A frozen vision
    tower encodes each batch's images once, before the loop, instead of at every visit.
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    if not any(p.requires_grad for p in model.model.visual.parameters()):
        with torch.no_grad():
            batches = [(_encoded(model, enc), weights) for enc, weights in batches]
    model.train()
    t0 = time.time()
    for step in range(steps):
        loss = _loss(model, *batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny %s step %d/%d loss %.3f (%.0fs)", stage, step + 1, steps, loss.item(), time.time() - t0)
    model.eval()


def _loss(model, enc: dict, weights: torch.Tensor) -> torch.Tensor:
    """Mean weighted cross-entropy of the next token, read only at the positions that carry weight."""
    at = weights[:, 1:] > 0  # position t predicts token t + 1
    hidden = model.model(**enc).last_hidden_state[:, :-1][at]
    nll = F.cross_entropy(model.lm_head(hidden), enc["input_ids"][:, 1:][at], reduction="none")
    return (nll * weights[:, 1:][at]).sum() / weights[:, 1:].sum()


def _encoded(model, enc: dict) -> dict:
    """`enc` with its images' vision-tower outputs in place of their pixels."""
    out = {k: v for k, v in enc.items() if k != "pixel_values"}
    ids = torch.arange(len(enc["image_grid_thw"]))
    return out | encode_unique(model, enc["pixel_values"], enc["image_grid_thw"], ids)


def _warm_start(model, processor, prompt: PromptBuilder, items: list, ws: dict, env: ZoomEnv) -> None:
    """Teacher-forced cross-entropy on the answer turns only (prompt and observation tokens are label -100)."""
    pad = processor.tokenizer.pad_token_id
    rng = random.Random(0)
    demos = [
        _demonstration(it, prompt, processor, env if rng.random() < ws["zoom"]["fraction"] else None, ws["zoom"], rng)
        for it in items
    ]
    answer_id = processor.tokenizer.convert_tokens_to_ids("<answer>")
    _fit(model, _batches(demos, ws["batch_size"], pad, answer_id, ws["answer_weight"]), ws["steps"], ws["lr"], "warm start")
