"""Prompt encoding: records -> chat text -> processor tensors, each prompt repeated G times."""

from __future__ import annotations

import torch
from torch import Tensor

from medvr.models.family import VISION_TOKENS
from medvr.prompts import PromptBuilder


def record_images(record: dict) -> list:
    """A record's images in prompt order: `image`, then any `extra_images`."""
    return [record["image"], *(record.get("extra_images") or [])]


def encode_prompts(
    processor, prompt: PromptBuilder, records: list[dict], repeat: int, system: str | None = None
) -> dict[str, Tensor]:
    """Left-padded processor output with every prompt's row (and images) repeated `repeat` times, contiguously.

    `system` replaces the prompt's system turn (an explore option's tool instructions). A record may
    carry several images (`extra_images`); `images_per_row` [B*G] counts each row's images.
    """
    texts = [
        processor.apply_chat_template(prompt.messages(r, system=system), add_generation_prompt=True, tokenize=False)
        for r in records
    ]
    images = [record_images(r) for r in records]
    enc = processor(
        text=texts, images=[i for row in images for i in row], padding=True, padding_side="left", return_tensors="pt"
    )
    rows = {k: enc[k].repeat_interleave(repeat, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    counts = torch.tensor([len(row) for row in images])
    per_image = torch.split(enc["pixel_values"], enc["image_grid_thw"].prod(-1).tolist())
    grids = torch.split(enc["image_grid_thw"], counts.tolist())
    starts = [0, *counts.cumsum(0).tolist()]
    rows["pixel_values"] = torch.cat(
        [p for b in range(len(records)) for _ in range(repeat) for p in per_image[starts[b] : starts[b + 1]]]
    )  # [P*G, D]
    rows["image_grid_thw"] = torch.cat([g for g in grids for _ in range(repeat)])  # [I*G, 3]
    rows["images_per_row"] = counts.repeat_interleave(repeat)  # [B*G]
    return rows


def stop_token_ids(processor) -> list[int]:
    """Tokens that end a completion: the chat end-of-turn and end-of-text tokens."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id, tok.pad_token_id}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)


def vision_token_ids(processor) -> list[int]:
    """Placeholder tokens only the processor may place; the policy never emits them."""
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(n) for n in VISION_TOKENS}
    return sorted(i for i in ids if i is not None and i != tok.unk_token_id)
