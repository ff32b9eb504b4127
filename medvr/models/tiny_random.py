"""A tiny randomly initialised checkpoint of each Qwen-VL family, built offline, for tests and smoke runs.

Each is a few hundred thousand parameters with the family's real architecture (Qwen2.5-VL's window
attention, Qwen3-VL's 16 px patches, deepstack and interleaved M-RoPE) and its real processor class
and image settings, saved with `save_pretrained`, so it loads through `ModelSpec` like a hub
checkpoint. There is no warm start: the policy is random, which exercises a family's plumbing
(loading, processor, positions, vision tower, sampling vs training log-probs), not learning.
`model=tiny_qwen2_5vl` / `model=tiny_qwen3vl` build one into the cache (`TinyRandom`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig, Qwen2VLImageProcessor

from medvr.models.family import Family, by_type
from medvr.models.tiny import CachedBuild

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
VISION_WIDTH, VISION_DEPTH, VISION_HEADS = 32, 2, 2
# what the vision config of each family needs beyond width, depth and heads
VISION = {
    "qwen2_vl": {"embed_dim": VISION_WIDTH, "mlp_ratio": 2, "hidden_size": TEXT["hidden_size"]},
    "qwen2_5_vl": {
        "hidden_size": VISION_WIDTH, "intermediate_size": 2 * VISION_WIDTH, "out_hidden_size": TEXT["hidden_size"],
        "window_size": 112, "fullatt_block_indexes": [VISION_DEPTH - 1],  # window attention, then one full block
    },
    "qwen3_vl": {
        "hidden_size": VISION_WIDTH, "intermediate_size": 2 * VISION_WIDTH, "out_hidden_size": TEXT["hidden_size"],
        "num_position_embeddings": 64, "deepstack_visual_indexes": list(range(VISION_DEPTH)),
    },
}


def build_tiny_random(model_type: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random `model_type` checkpoint (qwen2_vl | qwen2_5_vl | qwen3_vl) with the tokenizer of `tokenizer_dir`."""
    fam = by_type(model_type, "build_tiny_random")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_settings = {"patch_size": fam.patch_size, "merge_size": fam.merge_size,
                      "image_mean": list(fam.image_mean), "image_std": list(fam.image_std)}
    processor = getattr(transformers, fam.processor_class)(
        image_processor=Qwen2VLImageProcessor(**image_settings),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, fam.video_processor_class)(**image_settings),
        chat_template=tokenizer.chat_template,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(_config(fam, tokenizer))
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(eos_token_id=[stop, tokenizer.pad_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


class TinyRandom(CachedBuild):
    """`model=tiny_qwen2_5vl | tiny_qwen3vl`: a random tiny checkpoint of `family`, built once into the cache."""

    def __init__(self, cache_dir: str, family: str, seed: int, vocab_size: int, **spec):
        super().__init__(hub_id=None, path=None, **spec)
        self.seed, self.vocab_size = seed, vocab_size
        vision = VISION[by_type(family, "model.family").model_type]
        self.params = {"family": family, "seed": seed, "vocab_size": vocab_size, "text": TEXT, "vision": vision}
        key = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        self.build_dir = Path(cache_dir) / f"tiny-random-{family}-{key}"

    def _build_into(self, directory: Path) -> None:
        from medvr.data import synthetic
        from medvr.models.tiny_tokenizer import train_tokenizer

        train_tokenizer(synthetic.corpus_texts(256, seed=self.seed), self.vocab_size).save_pretrained(directory)
        build_tiny_random(self.params["family"], directory, directory, seed=self.seed)


def _config(fam: Family, tokenizer):
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    half = head_dim // 2
    t = half // 4  # M-RoPE sections (temporal, height, width) in Qwen's proportions
    sections = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}
    if fam.model_type == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = {
        **TEXT,
        "head_dim": head_dim,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "rope_parameters": rope,
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {"depth": VISION_DEPTH, "num_heads": VISION_HEADS, "patch_size": fam.patch_size,
              "spatial_merge_size": fam.merge_size, **VISION[fam.model_type]}
    return getattr(transformers, fam.config_class)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
