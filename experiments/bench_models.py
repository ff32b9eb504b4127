"""Random-weight models with Qwen2-VL-2B's and Qwen2.5-VL-7B's shapes for `experiments/bench.py --gpu`.

    python experiments/bench_models.py NAME TINY_DIR OUT_DIR DTYPE [--shrink]   # bench.py runs this

No machine here reaches the hub, so the shapes are the published config.json values of
Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct, written out below; the weights are random.
The tokenizer and chat template are the tiny model's (a Qwen2 BPE with the Qwen special tokens, whose
ids the configs take), in the family's own processor class and image settings (medvr/models/family.py);
the vocabulary keeps the published size, so embedding, LM head and softmax cost what they cost in the
real models (ids the tiny tokenizer lacks decode to empty text). `--shrink` keeps the structure but cuts widths and depths,
so that the --gpu path can be run through on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from medvr.models.family import by_type

BUILD_VERSION = 2  # part of a built model's cache key: bump whenever build() changes
MROPE = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]}
# published special-token ids (used where no tokenizer is at hand, e.g. to count parameters)
QWEN_TOKENS = {"bos": 151643, "eos": 151645, "pad": 151643, "image_token_id": 151655, "video_token_id": 151656,
               "vision_start_token_id": 151652, "vision_end_token_id": 151653}
SHAPES = {
    # Qwen/Qwen2-VL-2B-Instruct: 2.21B parameters; trained in full (MedVLM-R1)
    "qwen2vl_2b": {
        "model_type": "qwen2_vl",
        "tie_word_embeddings": True,
        "text": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                 "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768},
        "vision": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 1536,
                   "hidden_act": "quick_gelu"},
        "medvr_model": "qwen2vl_2b",
        "params": 2_208_985_600,
    },
    # Qwen/Qwen2.5-VL-7B-Instruct: 8.29B parameters; LoRA (rank 64 on the language model), as full
    # fine-tuning with a reference copy and AdamW states does not fit one 80 GB GPU
    "qwen25vl_7b": {
        "model_type": "qwen2_5_vl",
        "tie_word_embeddings": False,
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                   "out_hidden_size": 3584, "hidden_act": "silu", "window_size": 112,
                   "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
        "medvr_model": "qwen2_5vl_7b_lora",
        "params": 8_292_166_656,
    },
}
# --shrink: the same structure at a size a CPU runs in seconds (head_dim stays 128 for M-RoPE's sections)
SHRUNK_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 4096}
SHRUNK_VISION = {
    "qwen2_vl": {"depth": 2, "embed_dim": 64, "num_heads": 2},
    "qwen2_5_vl": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "fullatt_block_indexes": [1]},
}


def config_for(name: str, tokens: dict | None = None, shrink: bool = False):
    """The transformers config of model `name` (SHAPES), with the given special-token ids."""
    from transformers import AutoConfig

    shape = SHAPES[name]
    tokens = tokens or QWEN_TOKENS
    text = {**shape["text"], "rms_norm_eps": 1e-6, "rope_parameters": dict(MROPE), "bos_token_id": tokens["bos"],
            "eos_token_id": tokens["eos"], "pad_token_id": tokens["pad"], "use_cache": True}
    fam = by_type(shape["model_type"])
    vision = {**shape["vision"], "patch_size": fam.patch_size, "spatial_merge_size": fam.merge_size,
              "temporal_patch_size": 2}
    if shrink:
        text |= SHRUNK_TEXT
        vision |= SHRUNK_VISION[shape["model_type"]]
    if shape["model_type"] == "qwen2_vl":
        vision["hidden_size"] = text["hidden_size"]  # Qwen2-VL's merger projects onto the text width
    else:
        vision["out_hidden_size"] = text["hidden_size"]
    ids = {k: v for k, v in tokens.items() if k.endswith("token_id")}
    return AutoConfig.for_model(shape["model_type"], text_config=text, vision_config=vision,
                                tie_word_embeddings=shape["tie_word_embeddings"], **ids)


def param_count(config) -> int:
    """Parameters of a model built from `config`, counted on the meta device (no memory)."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


def tiny_tokens(tiny_dir: str) -> dict:
    config = json.loads((Path(tiny_dir) / "config.json").read_text())
    text = config["text_config"]
    return {"bos": text["bos_token_id"], "eos": text["eos_token_id"], "pad": text["pad_token_id"],
            **{k: config[k] for k in QWEN_TOKENS if k.endswith("token_id")}}


def model_dir(name: str, tiny_dir: str, cache_dir: str, dtype: str, shrink: bool) -> Path:
    """Where the random model of `name` is kept: keyed by its config, dtype and the tiny tokenizer."""
    key = json.dumps([BUILD_VERSION, config_for(name, tiny_tokens(tiny_dir), shrink).to_dict(), dtype,
                      Path(tiny_dir).name],
                     sort_keys=True, default=str)
    suffix = "-shrunk" if shrink else ""
    return Path(cache_dir) / f"bench-{name}{suffix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build(name: str, tiny_dir: str, out: Path, dtype: str, shrink: bool) -> None:
    """Random weights (seed 0, initialised on the GPU when there is one) + the tiny tokenizer in the family's
    processor (medvr/models/family.py), as an HF directory."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLImageProcessor

    if (out / "config.json").is_file():
        return
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config_for(name, tiny_tokens(tiny_dir), shrink),
                                                        dtype=getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.save_pretrained(tmp, max_shard_size="5GB")
    fam = by_type(model.config.model_type)
    tiny = AutoProcessor.from_pretrained(tiny_dir)
    images = {"patch_size": fam.patch_size, "merge_size": fam.merge_size,
              "image_mean": list(fam.image_mean), "image_std": list(fam.image_std)}
    processor = getattr(transformers, fam.processor_class)(
        image_processor=Qwen2VLImageProcessor(**images), tokenizer=tiny.tokenizer,
        video_processor=getattr(transformers, fam.video_processor_class)(**images), chat_template=tiny.chat_template)
    processor.save_pretrained(tmp)
    tmp.rename(out)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], "--shrink" in sys.argv[5:])
