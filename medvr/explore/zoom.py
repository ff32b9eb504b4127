"""The zoom environment: parse `<zoom>[x1, y1, x2, y2]</zoom>`, crop the original image, observe.

Coordinates follow the model's convention (`model.box_scale`, medvr/models/family.py): an int N for
integers normalised to 0..N (Qwen2-VL and Qwen3-VL: 1000), `resized` for absolute pixels of the
image as the model sees it after the processor's resize (Qwen2.5-VL), null for pixels of the original
image. The crop comes from the ORIGINAL full-resolution image, so zooming reveals detail the
downsized first view lost; it is then resized within the model's pixel budget.
A malformed action never raises: it becomes a textual error observation (DESIGN.md, EVR).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

ACTION_OPEN, ACTION_CLOSE = "<zoom>", "</zoom>"
_NUM = r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*"
_ACTION = re.compile(rf"<zoom>\s*\[{_NUM},{_NUM},{_NUM},{_NUM}\]\s*</zoom>", re.DOTALL)
# box_scale of the pixels of the resized model input (Qwen2.5-VL's grounding convention)
RESIZED = "resized"


def describe_box_scale(box_scale: int | str | None) -> str:
    """The coordinates a `box_scale` asks for, in the words of the zoom tool's instructions (prompt.zoom_system)."""
    if box_scale is None or box_scale == RESIZED:
        return "integer pixel coordinates of the image"
    return f"integer coordinates from 0 to {box_scale}"


@dataclass
class Observation:
    text: str  # chat text appended after the action (holds <|image_pad|> when there is a crop)
    image: Image.Image | None  # the resized crop, None for an error observation
    box: tuple[int, int, int, int] | None  # crop box in original-image pixels, None when invalid
    error: str | None  # why the action was rejected


def parse_action(text: str) -> tuple[float, float, float, float]:
    """The box of the last `<zoom>[...]</zoom>` in `text`; ValueError says what is wrong with it."""
    start = text.rfind(ACTION_OPEN)
    if start < 0:
        raise ValueError(f"no {ACTION_OPEN} in the action")
    match = _ACTION.match(text[start:])
    if match is None:
        raise ValueError(f"unparsable action {text[start:]!r}: expected <zoom>[x1, y1, x2, y2]</zoom>")
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"zero-area box [{x1:g}, {y1:g}, {x2:g}, {y2:g}]: need x2 > x1 and y2 > y1")
    return x1, y1, x2, y2


def _fit_side(lo: float, hi: float, min_side: int, size: int) -> tuple[int, int]:
    """Integer [lo, hi) of at least `min_side` (at most `size`), grown about its centre, shifted inside [0, size)."""
    lo, hi = math.floor(lo), math.ceil(hi)
    side = min(max(hi - lo, min_side), size)
    centre = (lo + hi) / 2
    lo = int(round(centre - side / 2))
    lo = min(max(lo, 0), size - side)
    return lo, lo + side


class ZoomEnv:
    """Turns an action string into an observation: the crop as a new image, or an error message."""

    def __init__(
        self,
        box_scale: int | str | None,
        min_side: int,
        upscale: float,
        min_pixels: int,
        max_pixels: int,
        observation: str,
        invalid_observation: str,
        image_factor: int | None = None,
    ):
        if isinstance(box_scale, str) and box_scale != RESIZED:
            raise ValueError(f"explore.env.box_scale={box_scale!r}: expected an int, {RESIZED} or null")
        if box_scale == RESIZED and image_factor is None:
            raise ValueError(
                f"explore.env.box_scale={RESIZED} needs explore.env.image_factor (the model's model.image_factor): "
                f"the resized image's sides are multiples of it"
            )
        self.box_scale = box_scale
        self.image_factor = image_factor
        self.min_side = min_side
        self.upscale = upscale
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.observation = observation
        self.invalid_observation = invalid_observation

    def frame(self, width: int, height: int) -> tuple[int, int]:
        """The (x, y) extent of the model's coordinates on an image of `width` x `height` original pixels."""
        if self.box_scale is None:
            return width, height
        if self.box_scale == RESIZED:  # the processor's own resize, so the frame is the image the model saw
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

            h, w = smart_resize(height, width, self.image_factor, self.min_pixels, self.max_pixels)
            return w, h
        return self.box_scale, self.box_scale

    def to_pixels(self, box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
        """Model coordinates -> clamped pixel box [x1, y1, x2, y2) of at least `min_side` a side."""
        sx, sy = self.frame(width, height)
        x1, x2 = min(max(box[0] * width / sx, 0), width), min(max(box[2] * width / sx, 0), width)
        y1, y2 = min(max(box[1] * height / sy, 0), height), min(max(box[3] * height / sy, 0), height)
        if x2 <= x1 or y2 <= y1:
            limit = f"0..{sx}" if isinstance(self.box_scale, int) else f"0..{sx} x 0..{sy} pixels"
            raise ValueError(f"box {list(box)} lies outside the image ({limit})")
        x1, x2 = _fit_side(x1, x2, self.min_side, width)
        y1, y2 = _fit_side(y1, y2, self.min_side, height)
        return x1, y1, x2, y2

    def from_pixels(self, box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel box -> the model's coordinate convention, rounded outwards (covers the box; never zero area)."""
        sx, sy = self.frame(width, height)
        eps = 1e-6
        return (
            math.floor(box[0] * sx / width + eps),
            math.floor(box[1] * sy / height + eps),
            math.ceil(box[2] * sx / width - eps),
            math.ceil(box[3] * sy / height - eps),
        )

    def crop(self, image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        """Crop the original image and upscale it by `upscale`, kept within [min_pixels, max_pixels]."""
        region = image.crop(box)
        w, h = region.size
        area = (w * self.upscale) * (h * self.upscale)
        scale = self.upscale * math.sqrt(min(1.0, self.max_pixels / area) * max(1.0, self.min_pixels / area))
        if area > self.max_pixels:  # round towards the budget so it holds exactly
            fit = lambda v: math.floor(v + 1e-6)
        elif area < self.min_pixels:
            fit = lambda v: math.ceil(v - 1e-6)
        else:
            fit = round
        size = (max(1, fit(w * scale)), max(1, fit(h * scale)))
        return region.resize(size, Image.BICUBIC)

    def step(self, action: str, image: Image.Image) -> Observation:
        """Observation for one action text ending in `</zoom>`; errors become text, never exceptions."""
        try:
            box = self.to_pixels(parse_action(action), *image.size)
        except ValueError as err:
            return Observation(self.invalid_observation.format(error=err), None, None, str(err))
        return Observation(self.observation, self.crop(image, box), box, None)
