"""Stage 1 of the tiny build: teach the vision tower to see, as a real VLM's pretrained encoder can.

A real base VLM reaches RL with a vision encoder pretrained on images at every scale. The tiny
model's random tower cannot learn to see from a few hundred text-supervised steps, so the build
first trains it alone, with small probe heads on its merged tokens, on two views of every item of
a pool of its own (`vision_pretraining.items`, a split nothing else sees): the whole image at the
model's pixel budget and a crop around the finding as the zoom tool shows it. The probes ask for
everything the questions ask: which tokens hold the lesion (its location), the modality, and the
lesion's shape, texture and dot count. Nothing decides which facts are readable at which scale: the
pixels do. At the whole-image budget the lesion spans about one merged token and its texture, outline
and dots blur away; in the crop they are larger.
The probe heads are discarded; only the tower's weights stay in the checkpoint.
"""

from __future__ import annotations

import logging
import random
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvr.data import synthetic
from medvr.explore.zoom import ZoomEnv
from medvr.rollout.images import patch_slices

log = logging.getLogger(__name__)
_ENCODE_CHUNK = 256  # views per image-processor call
MERGED = 28  # pixels of the resized image per merged vision token side (14 px patches, 2 x 2 merge)


class _Probes(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lesion = nn.Linear(hidden, 1)
        self.modality = nn.Linear(hidden, len(synthetic.MODALITIES))
        self.shape = nn.Linear(hidden, len(synthetic.SHAPES))
        self.texture = nn.Linear(hidden, len(synthetic.TEXTURES))
        self.count = nn.Linear(hidden, 4)
        self.quadrant = nn.Linear(hidden, len(synthetic.QUADRANTS))
        self.where = nn.Linear(hidden, len(synthetic.QUADRANTS))


def _view(item, image, box, pixel_values: Tensor, grid: Tensor, whole: bool) -> dict:
    """Processor output for one view plus its labels; `box` is the lesion box in this view's pixels."""
    _, gh, gw = grid[0].tolist()
    rows, cols = gh // 2, gw // 2
    sx, sy = gw * 14 / image.size[0], gh * 14 / image.size[1]  # original -> resized pixels
    x1, y1, x2, y2 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    ys = torch.arange(rows).unsqueeze(1) * MERGED
    xs = torch.arange(cols).unsqueeze(0) * MERGED
    overlap = (xs < x2) & (xs + MERGED > x1) & (ys < y2) & (ys + MERGED > y1)
    r, facts = item.record, item.facts
    # the quadrant each merged token lies in (of a whole image: a crop has no quadrants)
    where = (2 * (ys >= rows * MERGED / 2) + (xs >= cols * MERGED / 2)).flatten() if whole else torch.full((rows * cols,), -100)
    return {
        "pixel_values": pixel_values,
        "grid": grid,
        "lesion": overlap.flatten().float(),
        "where": where,
        "modality": synthetic.MODALITIES.index(r["modality"]),
        "shape": synthetic.SHAPES.index(facts["shape"]),
        "texture": synthetic.TEXTURES.index(facts["texture"]),
        "count": facts["count"] - 1,
        # where the lesion lies in the whole image; a crop does not show it
        "quadrant": synthetic.QUADRANTS.index(facts["quadrant"]) if whole else -100,
    }


def jittered_box(record: dict, env: ZoomEnv, jitter: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A zoom box in the model's coordinates around the record's lesion: each edge pushed out by up to
    `jitter` of the lesion box's longer side (how the warm start demonstrates the zoom tool)."""
    (x1, y1, x2, y2), (w, h) = record["bbox"], record["image"].size
    pad = jitter * max(x2 - x1, y2 - y1)
    box = [x1 - pad * rng.random(), y1 - pad * rng.random(), x2 + pad * rng.random(), y2 + pad * rng.random()]
    return env.from_pixels(tuple(round(min(max(v, 0), m)) for v, m in zip(box, (w, h, w, h))), w, h)


def views(items: list, processor, env: ZoomEnv, jitter: float, rng: random.Random) -> list[dict]:
    """The whole image and one jittered crop around the finding, per item."""
    shown = []  # (item, image, lesion box in its pixels, whole?) per view
    for item in items:
        image, (x1, y1, x2, y2) = item.record["image"], item.record["bbox"]
        shown.append((item, image, (x1, y1, x2, y2), True))
        crop_box = env.to_pixels(jittered_box(item.record, env, jitter, rng), *image.size)
        crop = env.crop(image, crop_box)
        cx, cy = crop_box[0], crop_box[1]
        fx, fy = crop.size[0] / (crop_box[2] - cx), crop.size[1] / (crop_box[3] - cy)
        inside = ((x1 - cx) * fx, (y1 - cy) * fy, (x2 - cx) * fx, (y2 - cy) * fy)
        shown.append((item, crop, inside, False))
    out = []
    for start in range(0, len(shown), _ENCODE_CHUNK):  # one processor call per chunk: per image, it is most of the cost
        chunk = shown[start : start + _ENCODE_CHUNK]
        enc = processor.image_processor(images=[image for _, image, _, _ in chunk], return_tensors="pt")
        grids = enc["image_grid_thw"]
        for i, ((item, image, box, whole), rows) in enumerate(zip(chunk, patch_slices(grids))):
            out.append(_view(item, image, box, enc["pixel_values"][rows], grids[i : i + 1], whole))
    return out


def _loss(probes: _Probes, tokens: list[Tensor], batch: list[dict]) -> Tensor:
    lesion_logits = torch.cat([probes.lesion(t).squeeze(-1) for t in tokens])
    lesion = torch.cat([v["lesion"] for v in batch])
    pooled = torch.stack([t.mean(0) for t in tokens])
    weights = [v["lesion"] / v["lesion"].sum().clamp(min=1) for v in batch]
    at_lesion = torch.stack([(w.unsqueeze(1) * t).sum(0) for w, t in zip(weights, tokens)])
    target = lambda key: torch.tensor([v[key] for v in batch])
    where = torch.cat([v["where"] for v in batch])
    return (
        F.cross_entropy(probes.where(torch.cat(tokens)), where, ignore_index=-100)
        + F.binary_cross_entropy_with_logits(lesion_logits, lesion)
        + F.cross_entropy(probes.modality(pooled), target("modality"))
        + F.cross_entropy(probes.shape(at_lesion), target("shape"))
        + F.cross_entropy(probes.texture(at_lesion), target("texture"))
        + F.cross_entropy(probes.count(at_lesion), target("count"))
        + F.cross_entropy(probes.quadrant(pooled), target("quadrant"), ignore_index=-100)
    )


def pretrain_vision(model, data: list[dict], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train `model`'s vision tower (and throw-away probe heads) on `views` output; returns the loss per step."""
    inner = model.model
    probes = _Probes(model.config.get_text_config().hidden_size)
    params = [*inner.visual.parameters(), *probes.parameters()]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    t0 = time.time()
    losses = []
    inner.visual.train()
    for step in range(steps):
        batch = order.sample(data, min(batch_size, len(data)))
        pixels = torch.cat([v["pixel_values"] for v in batch])
        grids = torch.cat([v["grid"] for v in batch])
        tokens = inner.get_image_features(pixels, grids, return_dict=True).pooler_output
        loss = _loss(probes, list(tokens), batch)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.info("tiny vision pretraining step %d/%d loss %.3f (%.0fs)", step + 1, steps, loss.item(), time.time() - t0)
    return losses
