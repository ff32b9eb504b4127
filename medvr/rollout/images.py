"""Each unique image through the vision tower once: G rows of one prompt share its features.

A rollout batch repeats every prompt's image G times (one copy per completion). The vision tower
(675M parameters for Qwen2-VL-2B) then runs G times per forward. Instead, the unique images are
encoded once and their features handed to the model as `mm_encoder_outputs`, the pre-encoded
input every Qwen-VL family's forward takes in place of `pixel_values`. With grad enabled the
encoding is part of the graph, so the vision tower still trains: its gradient is the sum over
the rows that share the image, as with G separate encodings.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from transformers.modeling_outputs import ModelOutput


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The name of the forward's KV-cache argument: transformers renamed `past_key_values` to `cache`
    (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def patch_slices(image_grid_thw: Tensor) -> list[slice]:
    """[I, 3] grids -> the rows of `pixel_values` holding each image's patches."""
    ends = image_grid_thw.prod(-1).cumsum(0).tolist()
    return [slice(lo, hi) for lo, hi in zip([0, *ends[:-1]], ends)]


def take(features: ModelOutput, index: list[int]) -> ModelOutput:
    """The encoder output of images `index` (repeats allowed), from the output of the unique images.

    Per-image fields are tuples with one tensor per image (`pooler_output`; Qwen3-VL's
    `deepstack_features` is a list of such tuples, one per injection layer). Fields that
    concatenate all images' patches (`last_hidden_state`) cannot be re-indexed and are dropped:
    the language model never reads them.
    """
    out = {}
    for key, value in features.items():
        if isinstance(value, tuple) and all(isinstance(v, Tensor) for v in value):
            out[key] = tuple(value[i] for i in index)
        elif isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
            out[key] = [tuple(level[i] for i in index) for level in value]
    return type(features)(**out)


def encode_unique(model, pixel_values: Tensor, image_grid_thw: Tensor, image_ids: Tensor) -> dict:
    """Model inputs replacing `pixel_values`: each distinct `image_ids` value encoded once.

    `pixel_values` [P, D] and `image_grid_thw` [I, 3] hold every image in row order, repeats
    included; `image_ids` [I] gives equal ids to copies of one image. Returns `mm_encoder_outputs`
    and `image_grid_thw` (still one row per image: M-RoPE positions need every placeholder's grid).
    """
    ids = image_ids.tolist()
    first: dict[int, int] = {}
    for i, key in enumerate(ids):
        first.setdefault(key, i)
    unique = list(first.values())  # position of each distinct image's first copy
    slot = {key: n for n, key in enumerate(first)}
    slices = patch_slices(image_grid_thw)
    pixels = torch.cat([pixel_values[slices[i]] for i in unique])
    inner = base_model(model).model
    features = inner.get_image_features(pixels, image_grid_thw[unique], return_dict=True)
    return {
        "mm_encoder_outputs": {"image": take(features, [slot[key] for key in ids])},
        "image_grid_thw": image_grid_thw,
    }
