"""What differs between the Qwen-VL generations medvr trains, in one place, keyed by config.json's `model_type`.

Qwen2-VL (arXiv 2409.12191), Qwen2.5-VL (arXiv 2502.13923) and Qwen3-VL share the chat markup, the
vision placeholder tokens, M-RoPE fed by `mm_token_type_ids`, and `Qwen2VLImageProcessor`'s resize
(sides rounded to multiples of patch x merge, area within the pixel budget). They differ in patch
size, image normalisation, vision-tower layout (window attention; Qwen3-VL's deepstack) and the box
coordinates of their grounding data, which a zooming policy should keep writing:
- Qwen2-VL: integers normalised to [0, 1000) (QwenLM/Qwen3-VL#866);
- Qwen2.5-VL: absolute pixels of the image after the processor's resize (QwenLM/Qwen3-VL#676);
- Qwen3-VL: normalised to 0..1000 again (QwenLM/Qwen3-VL#1741).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# placeholder tokens only the processor may place (every family spells them alike)
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class UnsupportedFamilyError(ValueError):
    """A checkpoint whose architecture medvr has no entry for."""


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    patch_size: int  # vision patch side in pixels
    merge_size: int  # patches merged into one language-model token, per side
    box_scale: int | str  # coordinates of the pretrained grounding data, as a ZoomEnv box_scale
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # transformers class names: configuration, model, processor, video processor (the tiny builds use them)
    config_class: str
    model_class: str
    processor_class: str
    video_processor_class: str
    vision_tower: str = "visual"  # attribute of the inner model (`model.model`) holding the vision encoder

    @property
    def image_factor(self) -> int:
        """Side in pixels of one merged vision token: the processor resizes image sides to multiples of it."""
        return self.patch_size * self.merge_size

    def processor_kwargs(self, min_pixels: int, max_pixels: int) -> dict:
        """`AutoProcessor.from_pretrained` kwargs that set the pixel budget (min/max area of a resized image)."""
        return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "qwen2_vl", patch_size=14, merge_size=2, box_scale=1000, image_mean=CLIP_MEAN, image_std=CLIP_STD,
            config_class="Qwen2VLConfig", model_class="Qwen2VLForConditionalGeneration",
            processor_class="Qwen2VLProcessor", video_processor_class="Qwen2VLVideoProcessor",
        ),
        Family(
            "qwen2_5_vl", patch_size=14, merge_size=2, box_scale="resized", image_mean=CLIP_MEAN, image_std=CLIP_STD,
            config_class="Qwen2_5_VLConfig", model_class="Qwen2_5_VLForConditionalGeneration",
            processor_class="Qwen2_5_VLProcessor", video_processor_class="Qwen2VLVideoProcessor",
        ),
        Family(
            "qwen3_vl", patch_size=16, merge_size=2, box_scale=1000, image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5), config_class="Qwen3VLConfig", model_class="Qwen3VLForConditionalGeneration",
            processor_class="Qwen3VLProcessor", video_processor_class="Qwen3VLVideoProcessor",
        ),
    )
}


def by_type(model_type: str, where: str = "the checkpoint") -> Family:
    """The registry entry of `model_type`; the error names `where` the type came from."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedFamilyError(
            f"{where} has model_type {model_type!r}, not a Qwen-VL family medvr supports ({', '.join(FAMILIES)}); "
            f"add its entry to medvr/models/family.py"
        ) from None


def of_model(model) -> Family:
    """The family of a loaded model (a peft wrapper included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return by_type(base.config.model_type, f"model {type(base).__name__}")


def vision_tower(model) -> torch.nn.Module:
    """The vision encoder of a loaded model (a peft wrapper included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.model, of_model(base).vision_tower)
