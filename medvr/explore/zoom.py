"""The zoom environment: parse `<zoom>[x1, y1, x2, y2]</zoom>`, crop the original image, observe.

Coordinates follow the model's convention (`model.box_scale`: 0..1000 normalised for Qwen2-VL,
null for absolute pixels). The crop comes from the ORIGINAL full-resolution image, so zooming
reveals detail the downsized first view lost; it is then resized within the model's pixel budget.
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
        box_scale: int | None,
        min_side: int,
        upscale: float,
        min_pixels: int,
        max_pixels: int,
        observation: str,
        invalid_observation: str,
    ):
        self.box_scale = box_scale
        self.min_side = min_side
        self.upscale = upscale
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.observation = observation
        self.invalid_observation = invalid_observation

    def to_pixels(self, box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
        """Model coordinates -> clamped pixel box [x1, y1, x2, y2) of at least `min_side` a side."""
        s = self.box_scale or 1
        sw, sh = (width, height) if self.box_scale else (1, 1)
        x1, x2 = min(max(box[0] * sw / s, 0), width), min(max(box[2] * sw / s, 0), width)
        y1, y2 = min(max(box[1] * sh / s, 0), height), min(max(box[3] * sh / s, 0), height)
        if x2 <= x1 or y2 <= y1:
            limit = f"0..{self.box_scale}" if self.box_scale else f"0..{width} x 0..{height} pixels"
            raise ValueError(f"box {list(box)} lies outside the image ({limit})")
        x1, x2 = _fit_side(x1, x2, self.min_side, width)
        y1, y2 = _fit_side(y1, y2, self.min_side, height)
        return x1, y1, x2, y2

    def from_pixels(self, box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel box -> the model's coordinate convention, rounded outwards (covers the box; never zero area)."""
        if not self.box_scale:
            return box
        s = self.box_scale
        eps = 1e-6
        return (
            math.floor(box[0] * s / width + eps),
            math.floor(box[1] * s / height + eps),
            math.ceil(box[2] * s / width - eps),
            math.ceil(box[3] * s / height - eps),
        )

    def crop(self, image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        """Crop the original image and upscale it by `upscale`, kept within [min_pixels, max_pixels]."""
        region = image.crop(box)
        w, h = region.size
        area = (w * self.upscale) * (h * self.upscale)
        scale = self.upscale * math.sqrt(min(1.0, self.max_pixels / area) * max(1.0, self.min_pixels / area))
        if area > self.max_pixels:  # round towards the budget so it holds exactly
            fit = lambda v: math.floor(v + 1e-6)  # noqa: E731
        elif area < self.min_pixels:
            fit = lambda v: math.ceil(v - 1e-6)  # noqa: E731
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
