"""Prompt encoding: records -> chat text -> processor tensors, each prompt repeated G times."""

from __future__ import annotations

import torch
from torch import Tensor

from medvr.prompts import PromptBuilder


def encode_prompts(
    processor, prompt: PromptBuilder, records: list[dict], repeat: int, system: str | None = None
) -> dict[str, Tensor]:
    """Left-padded processor output with every prompt's row (and image) repeated `repeat` times, contiguously.

    `system` replaces the prompt's system turn (an explore option's tool instructions).
    """
    texts = [
        processor.apply_chat_template(prompt.messages(r, system=system), add_generation_prompt=True, tokenize=False)
        for r in records
    ]
    enc = processor(
        text=texts, images=[r["image"] for r in records], padding=True, padding_side="left", return_tensors="pt"
    )
    rows = {k: enc[k].repeat_interleave(repeat, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    patches = enc["image_grid_thw"].prod(-1).tolist()  # one image per prompt
    per_image = torch.split(enc["pixel_values"], patches)
    rows["pixel_values"] = torch.cat([p for p in per_image for _ in range(repeat)])  # [P*G, D]
    rows["image_grid_thw"] = enc["image_grid_thw"].repeat_interleave(repeat, dim=0)  # [B*G, 3]
    return rows


def stop_token_ids(processor) -> list[int]:
    """Tokens that end a completion: the chat end-of-turn and end-of-text tokens."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id, tok.pad_token_id}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


def vision_token_ids(processor) -> list[int]:
    """Placeholder tokens only the processor may place; the policy never emits them."""
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(n) for n in names}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)
