"""`explore=none`: one turn of text-only reasoning, the MedVLM-R1 rollout (arXiv 2502.19634)."""

from __future__ import annotations

import torch

from medvr.prompts import PromptBuilder
from medvr.rollout.batch import Rollouts
from medvr.rollout.encode import encode_prompts, stop_token_ids, vision_token_ids
from medvr.rollout.generate import generation_config, sample


class SingleTurn:
    """All B*G completions in ONE batched `generate` call; no tools, no observations."""

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens

    def rollout(
        self,
        model,
        processor,
        prompt: PromptBuilder,
        records: list[dict],
        *,
        group_size: int,
        temperature: float,
        greedy: bool = False,
    ) -> Rollouts:
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in encode_prompts(processor, prompt, records, group_size).items()}
        config = generation_config(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            stop_ids=stop_token_ids(processor),
            pad_id=processor.tokenizer.pad_token_id,
            forbidden_ids=vision_token_ids(processor),
        )
        out = sample(model, enc, config, temperature)
        zeros = torch.zeros_like(out.tokens)
        texts = processor.tokenizer.batch_decode(out.tokens * out.mask, skip_special_tokens=True)
        return Rollouts(
            input_ids=torch.cat([enc["input_ids"], out.tokens], dim=1),
            attention_mask=torch.cat([enc["attention_mask"], out.mask], dim=1),
            mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], zeros], dim=1),
            loss_mask=torch.cat([torch.zeros_like(enc["input_ids"]), out.mask], dim=1),
            gen_logps=torch.cat([torch.zeros_like(enc["input_ids"], dtype=out.logps.dtype), out.logps], dim=1),
            entropies=torch.cat([torch.zeros_like(enc["input_ids"], dtype=out.logps.dtype), out.entropies], dim=1),
            truncated=out.truncated,
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
            images_per_row=torch.ones(len(out.tokens), dtype=torch.long, device=device),
            completions=[t.strip() for t in texts],
            group_size=group_size,
        )
