"""Procedural medical-VQA look-alikes (MRI, CT, X-ray scans with one small lesion and its box).

An offline stand-in for OmniMedVQA-style data: modality and lesion location are visible at low
resolution, the lesion's shape, texture and dot count only at full resolution, so zooming wins.
"""

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medvr.data.schema import LETTERS, records_dataset

_CHUNK = 64  # items a generate() worker draws per task
GENERATOR_VERSION = 5  # part of the cache key: bump whenever drawing or questions change
SIZES = ((256, 256), (288, 256), (256, 320), (320, 288))  # (width, height)
MODALITIES = ("MRI", "CT", "X-ray")
SHAPES = ("round", "square", "triangle", "cross")
TEXTURES = ("solid", "striped", "dotted", "hollow")
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")
QUESTION_TYPES = ("quadrant", "side", "modality", "shape", "texture", "count")
_MODALITY_OPTIONS = (*MODALITIES, "Ultrasound")  # a distractor never drawn
_SCAN_NAMES = {"MRI": "MRI scan", "CT": "CT scan", "X-ray": "X-ray image"}
_MODALITY_CUES = {
    "MRI": "The smooth soft-tissue contrast of the head on a dark background shows an MRI scan.",
    "CT": "The round grainy cross-section with a bright bone ring shows a CT scan.",
    "X-ray": "The two dark lung fields crossed by rib arcs show a chest X-ray image.",
}
QUESTIONS = {
    "quadrant": ("In which quadrant of the image is the lesion located?",
                 "Where in the image is the abnormality located?"),
    "side": ("Is the lesion on the left or the right side of the image?",
             "On which side of the image is the abnormality?"),
    "modality": ("What imaging modality was used to acquire this image?",
                 "Which type of scan is shown in this image?"),
    "shape": ("What is the shape of the lesion?", "Which shape does the abnormality have?"),
    "texture": ("What is the internal texture of the lesion?",
                "How does the inside of the abnormality look?"),
    "count": ("How many small bright dots are next to the lesion?",
              "How many tiny bright spots lie beside the abnormality?"),
}
_MARKER = "COMPLETE"  # written last into a cache dir; without it the cache is rebuilt
_ON, _OFF, _DOT = 245.0, 160.0, 250.0  # lesion gray levels: bright texture, dim texture, dots
_DOT_SIDE, _DOT_STEP = 3, 6  # satellite dots: side and pitch in px (one pixel each at the whole-image budget)
_LESION_SIDES = (22, 34)  # lesion side in px, [low, high): about one merged token at the whole-image budget


@dataclass
class SyntheticItem:
    """One generated record, a one-sentence rationale stating the answering fact, and every fact drawn."""

    record: dict
    rationale: str
    facts: dict


def _ellipse_radius(xx, yy, cx, cy, a, b):
    return np.sqrt(((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2)  # 1.0 on the outline


def _smooth_noise(rng, w, h, cells):
    """Low-frequency N(0, 1)-ish field: random cells interpolated bicubically."""
    small = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def _blur(img, radius):
    as_bytes = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))  # PIL blurs only 8-bit images
    return np.asarray(as_bytes.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)


def _mri(rng, xx, yy):
    """T1-like axial head: bright scalp, dark skull, folded gray-matter cortex, dark ventricles."""
    h, w = xx.shape
    cx, cy = w * rng.uniform(0.47, 0.53), h * rng.uniform(0.47, 0.53)
    a, b = w * rng.uniform(0.36, 0.42), h * rng.uniform(0.38, 0.44)
    r = _ellipse_radius(xx, yy, cx, cy, a, b)
    img = np.full((h, w), 8.0, np.float32)
    img[r < 1.0] = 185.0  # scalp fat
    img[r < 0.94] = 30.0  # skull
    angle = np.arctan2(yy - cy, xx - cx)
    # Gyri: the gray/white boundary undulates at two irregular frequencies.
    cortex_edge = 0.72 + 0.035 * np.cos(angle * rng.integers(11, 16) + rng.uniform(0, 6)) \
        + 0.025 * np.cos(angle * rng.integers(23, 31) + rng.uniform(0, 6))
    brain = 125.0 + 10.0 * _smooth_noise(rng, w, h, 6)
    brain = np.where(r > cortex_edge, brain - 38.0, brain)  # gray matter darker than white
    img = np.where(r < 0.88, brain, img)
    ventricles = np.full((h, w), np.inf, np.float32)  # radius in the nearer ventricle's ellipse
    for sign in (-1, 1):
        vx = cx + sign * (0.09 * a + 0.12 * (yy - cy))
        one = _ellipse_radius(xx, yy, vx, cy - 0.05 * b, 0.06 * a, 0.24 * b)
        ventricles = np.minimum(ventricles, one)
    img[ventricles < 1.0] = 40.0
    img = _blur(img, 1.0) + 2.5 * rng.standard_normal((h, w))
    return img, (r < 0.64) & (ventricles > 2.5)  # where a lesion may go


def _ct(rng, xx, yy):
    """Axial body CT: air, fat rim, organs, bright rib ring and spine, couch line, grainy noise."""
    h, w = xx.shape
    cx, cy = w * rng.uniform(0.47, 0.53), h * rng.uniform(0.44, 0.50)
    a, b = w * rng.uniform(0.40, 0.45), h * rng.uniform(0.32, 0.38)
    r = _ellipse_radius(xx, yy, cx, cy, a, b)
    img = np.zeros((h, w), np.float32)
    img[r < 1.0] = 110.0  # skin
    img[r < 0.985] = 70.0  # subcutaneous fat
    img[r < 0.93] = 105.0 + 5.0 * _smooth_noise(rng, w, h, 8)[r < 0.93]
    liver = _ellipse_radius(xx, yy, cx - 0.32 * a, cy - 0.05 * b, 0.36 * a, 0.45 * b) < 1
    img[liver & (r < 0.7)] = 130.0
    img[_ellipse_radius(xx, yy, cx + 0.35 * a, cy - 0.28 * b, 0.16 * a, 0.12 * b) < 1] = 35.0  # gas
    ribs = np.cos(np.arctan2(yy - cy, xx - cx) * rng.integers(10, 15)) > -0.25
    img[(r > 0.74) & (r < 0.80) & ribs] = 235.0
    spine = np.hypot(xx - cx, yy - (cy + 0.62 * b)) / (0.13 * b)
    img[spine < 1.0] = 230.0
    img[spine < 0.4] = 60.0  # spinal canal
    img[np.hypot(xx - cx + 0.1 * a, yy - cy - 0.38 * b) < 0.07 * b] = 175.0  # contrast-filled aorta
    img[(yy > cy + b + 6) & (yy < cy + b + 10) & (np.abs(xx - cx) < 0.46 * w)] = 150.0  # couch
    return _blur(img, 0.7), (r < 0.5) & (spine > 2.6)  # the finding stays clear of ribs and spine


def _xray(rng, xx, yy):
    """PA chest radiograph: bright torso, two dark lung fields with rib arcs, mediastinum, heart."""
    h, w = xx.shape
    cx = w * rng.uniform(0.47, 0.53)
    img = np.full((h, w), 20.0, np.float32)
    torso = _ellipse_radius(xx, yy, cx, h * 0.85, 0.52 * w, 0.75 * h) < 1
    img[torso | (np.abs(xx - cx) < 0.1 * w)] = 170.0  # torso, shoulders and neck
    lungs, core = np.zeros((h, w), bool), np.zeros((h, w), bool)
    ly, lb = h * rng.uniform(0.45, 0.49), h * rng.uniform(0.28, 0.31)
    taper = np.clip(0.75 + 0.3 * (yy - ly) / lb, 0.6, 1.05)  # lungs widen towards the diaphragm
    for sign in (-1, 1):
        lung_x = cx + sign * 0.2 * w
        lr = _ellipse_radius(xx, yy, lung_x, ly, 0.14 * w * taper, lb)
        dome = yy < ly + 0.6 * lb + 2.0 * (xx - lung_x) ** 2 / w  # diaphragm, lowest laterally
        lungs |= (lr < 1.0) & dome
        core |= (lr < 0.72) & dome
    field = 60.0 + 25.0 * (yy - ly) / lb + 8.0 * _smooth_noise(rng, w, h, 10)  # darker apices
    rib_phase = (yy + 1.2 * (xx - cx) ** 2 / w) / (h / rng.uniform(11, 13))
    field = field + 45.0 * (np.cos(2 * np.pi * rib_phase) > 0.55)
    img = np.where(lungs, field, img)
    img[np.abs(xx - cx) < 0.065 * w] = 205.0  # spine and mediastinum
    heart = _ellipse_radius(xx, yy, cx + 0.07 * w, h * 0.66, 0.15 * w, 0.13 * h)
    img[heart < 1.0] = 190.0
    clavicles = Image.new("L", (w, h))
    draw = ImageDraw.Draw(clavicles)
    for sign in (-1, 1):
        draw.line([(cx + sign * 0.05 * w, 0.2 * h), (cx + sign * 0.3 * w, 0.14 * h)], fill=1, width=6)
    img[np.asarray(clavicles, bool)] = 200.0
    return _blur(img, 1.5) + 3.0 * rng.standard_normal((h, w)), core & (heart > 1.3)


_DRAW = {"MRI": _mri, "CT": _ct, "X-ray": _xray}


def _lesion(shape, texture, s):
    """Gray levels of an s x s lesion patch (NaN = untouched pixel)."""
    canvas = Image.new("L", (s, s))
    draw, c, t = ImageDraw.Draw(canvas), (s - 1) / 2, max(6, round(0.4 * s))
    if shape == "round":
        draw.ellipse([0, 0, s - 1, s - 1], fill=255)
    elif shape == "square":
        draw.rectangle([1, 1, s - 2, s - 2], fill=255)
    elif shape == "triangle":
        draw.polygon([(c, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
    elif shape == "cross":
        lo = (s - t) // 2
        draw.rectangle([lo, 0, lo + t - 1, s - 1], fill=255)
        draw.rectangle([0, lo, s - 1, lo + t - 1], fill=255)
    else:  # diamond
        draw.polygon([(c, 0), (s - 1, c), (c, s - 1), (0, c)], fill=255)
    mask = np.asarray(canvas) > 0
    v, u = np.mgrid[0:s, 0:s]
    bright = {
        "solid": mask,
        "striped": (v // 2) % 2 == 0,
        "dotted": ((u + 1) % 4 < 2) & ((v + 1) % 4 < 2),
        "hollow": mask & ~(np.asarray(canvas.filter(ImageFilter.MinFilter(5))) > 0),
    }[texture]
    return np.where(mask, np.where(bright, _ON, _OFF), np.nan)


def _place(rng, allowed, s, count):
    """Corners of the s x s lesion and of its 2 x 2 satellite dots, and the finding's bbox.

    The bbox covers lesion and dots (so a zoom into it answers every question) and lies
    within one quadrant, so that quadrant and side answers are unambiguous.
    """
    h, w = allowed.shape
    ys, xs = np.nonzero(allowed)
    along = np.arange(count) * _DOT_STEP + (s - _DOT_STEP * count + _DOT_STEP - _DOT_SIDE) // 2  # centred on a side
    for _ in range(100):
        k = rng.integers(len(ys))
        x0, y0 = int(xs[k]) - s // 2, int(ys[k]) - s // 2
        across = s + 3 if rng.random() < 0.5 else -3 - _DOT_SIDE  # 3 px beyond the far or the near edge
        if rng.random() < 0.5:
            dots = [(x0 + across, y0 + int(a)) for a in along]  # right or left of the lesion
        else:
            dots = [(x0 + int(a), y0 + across) for a in along]  # below or above it
        corners = [(x0, y0), (x0 + s, y0 + s), *dots, *((x + _DOT_SIDE, y + _DOT_SIDE) for x, y in dots)]
        (x1, y1), (x2, y2) = np.min(corners, axis=0) - 2, np.max(corners, axis=0) + 2
        inside = x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h
        if inside and (x2 <= w / 2 or x1 >= w / 2) and (y2 <= h / 2 or y1 >= h / 2):
            return x0, y0, dots, [int(x1), int(y1), int(x2), int(y2)]
    raise RuntimeError("no room for the lesion; enlarge the anatomy's allowed region")


def _split_key(split):
    return zlib.crc32(split.encode())  # stable across processes, unlike hash()


def _balanced(seed, split, i, k, salt):
    """Index in range(k) that cycles through a fresh permutation every k items: balanced mixes."""
    block = np.random.default_rng([seed % 2**32, _split_key(split), salt, i // k])
    return int(block.permutation(k)[i % k])


def _question(kind, facts, rng):
    """Multiple-choice question about one fact: (question, options, answer letter, rationale).

    The options are every value of the fact, always in the same order (side: 2, the others: 4),
    so the key's letter is a fixed function of the fact. A model as small as the tiny one cannot
    learn in-context option lookup within its build budget; here reading the image is all it takes.
    The facts are drawn uniformly, so the keys spread over the letters: a policy that always gives
    one letter scores chance (1/2 on side, 1/4 elsewhere), never more.
    """
    scan, count = _SCAN_NAMES[facts["modality"]], facts["count"]
    dots = "is 1 small bright dot" if count == 1 else f"are {count} small bright dots"
    pool, correct, rationale = {
        "quadrant": (QUADRANTS, facts["quadrant"],
                     f"The lesion lies in the {facts['quadrant']} part of the {scan}."),
        "side": (("left", "right"), facts["side"],
                 f"The lesion lies on the {facts['side']} side of the {scan}."),
        "modality": (_MODALITY_OPTIONS, facts["modality"], _MODALITY_CUES[facts["modality"]]),
        "shape": (SHAPES, facts["shape"], f"The lesion has a {facts['shape']} outline."),
        "texture": (TEXTURES, facts["texture"], f"The inside of the lesion looks {facts['texture']}."),
        "count": (("1", "2", "3", "4"), str(count), f"There {dots} next to the lesion."),
    }[kind]
    options = [str(o) for o in pool]
    question = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))]
    return question, options, LETTERS[options.index(correct)], rationale


def _item(i, seed, split, types=QUESTION_TYPES):
    rng = np.random.default_rng([seed % 2**32, _split_key(split), i])
    modality = MODALITIES[_balanced(seed, split, i, len(MODALITIES), salt=1)]
    kind = types[_balanced(seed, split, i, len(types), salt=2)]
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img, allowed = _DRAW[modality](rng, xx, yy)
    # every fact cycles through its values (independently): balanced facts, so balanced answer letters
    shape = SHAPES[_balanced(seed, split, i, len(SHAPES), salt=3)]
    texture = TEXTURES[_balanced(seed, split, i, len(TEXTURES), salt=4)]
    count = 1 + _balanced(seed, split, i, 4, salt=5)
    quadrant = _balanced(seed, split, i, len(QUADRANTS), salt=6)  # QUADRANTS order: upper/lower x left/right
    allowed = allowed & ((yy >= h / 2) == (quadrant >= 2)) & ((xx >= w / 2) == (quadrant % 2 == 1))
    s = int(rng.integers(*_LESION_SIDES))
    x0, y0, dots, box = _place(rng, allowed, s, count)
    patch = _lesion(shape, texture, s)
    region = img[y0 : y0 + s, x0 : x0 + s]
    region[:] = np.where(np.isnan(patch), region, patch)
    for dx, dy in dots:
        img[dy : dy + _DOT_SIDE, dx : dx + _DOT_SIDE] = _DOT
    if modality == "CT":
        img += 10.0 * rng.standard_normal(img.shape)  # CT grain also covers the lesion
    else:
        img += 2.0 * rng.standard_normal(img.shape)
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    side = "left" if box[2] <= w / 2 else "right"
    facts = {"modality": modality, "shape": shape, "texture": texture, "count": count, "side": side,
             "quadrant": f"{'upper' if box[3] <= h / 2 else 'lower'} {side}"}
    question, options, answer, rationale = _question(kind, facts, rng)
    record = {"id": f"syn-{split}-{i:05d}", "image": image, "question": question, "options": options,
              "answer": answer, "modality": modality, "bbox": box, "question_type": kind}
    return SyntheticItem(record=record, rationale=rationale, facts=facts)


def pool_workers() -> int:
    """Processes for drawing a large pool (`generate(..., workers=pool_workers())`): the same items whatever
    the count, since each is seeded by its index."""
    return min(8, os.cpu_count() or 1)


def generate(n: int, seed: int, split: str = "train", question_types=QUESTION_TYPES, workers: int = 1) -> list[SyntheticItem]:
    """n records, deterministic in (n, seed, split, question_types); item i depends only on those and i.

    `question_types` (a subset of QUESTION_TYPES) asks only those, in balanced turns. `workers` > 1
    draws large pools in that many processes (the same items: each depends only on its index).
    """
    types = _checked_types(question_types)
    if workers <= 1 or n < 2 * _CHUNK:
        return [_item(i, seed, split, types) for i in range(n)]
    # fork (Linux) starts a worker in milliseconds; the workers only run numpy and PIL
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_item, range(n), repeat(seed), repeat(split), repeat(types), chunksize=_CHUNK))


def _checked_types(question_types, key: str = "question_types") -> tuple[str, ...]:
    types = tuple(question_types)
    unknown = sorted(set(types) - set(QUESTION_TYPES))
    if unknown or not types:
        raise ValueError(f"{key}={list(types)}: each must be one of {list(QUESTION_TYPES)} ({unknown} is not)")
    return types


def corpus_texts(n: int, seed: int) -> list[str]:
    """n question + options + rationale texts (no images), e.g. to train the tiny model's tokenizer."""
    rng = np.random.default_rng([seed % 2**32, _split_key("corpus")])
    texts = []
    for i in range(n):
        facts = {"modality": str(rng.choice(MODALITIES)), "shape": str(rng.choice(SHAPES)),
                 "texture": str(rng.choice(TEXTURES)), "count": int(rng.integers(1, 5)),
                 "quadrant": str(rng.choice(QUADRANTS))}
        facts["side"] = facts["quadrant"].split()[1]
        kind = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        question, options, answer, rationale = _question(kind, facts, rng)
        lines = [f"{LETTERS[j]}) {option}" for j, option in enumerate(options)]
        texts.append("\n".join([question, *lines, rationale, f"The answer is {answer}."]))
    return texts


class SyntheticVQA:
    """Data source: generated train/val/test splits, cached with save_to_disk under cache_dir.

    `question_types` are asked in every split; `train_question_types` (a subset of them; null = the same)
    only in train, so a run can train on some types and be measured on all (as MedVLM-R1 trains on MRI
    and tests on MRI, CT and X-ray).
    """

    name = "synthetic"

    def __init__(self, n_train: int, n_val: int, n_test: int, seed: int, cache_dir: str, question_types=None,
                 train_question_types=None):
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.seed = seed
        self.question_types = _checked_types(question_types or QUESTION_TYPES)  # a bad type fails before any work
        self.train_question_types = _checked_types(train_question_types or self.question_types, "train_question_types")
        if outside := sorted(set(self.train_question_types) - set(self.question_types)):
            raise ValueError(f"train_question_types={list(self.train_question_types)}: {outside} not in "
                             f"question_types={list(self.question_types)}")
        self.cache_dir = Path(cache_dir)

    @property
    def cache_path(self) -> Path:
        params = {**self.sizes, "seed": self.seed, "version": GENERATOR_VERSION}
        if self.question_types != QUESTION_TYPES:  # the default keeps the key it always had
            params["question_types"] = list(self.question_types)
        if self.train_question_types != self.question_types:
            params["train_question_types"] = list(self.train_question_types)
        key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"synthetic-{key}"

    def build(self) -> datasets.DatasetDict:
        workers = pool_workers()
        return datasets.DatasetDict({
            split: records_dataset([item.record for item in generate(n, self.seed, split, self._types(split), workers)])
            for split, n in self.sizes.items()
        })

    def _types(self, split: str) -> tuple[str, ...]:
        return self.train_question_types if split == "train" else self.question_types

    def load(self) -> datasets.DatasetDict:
        path = self.cache_path
        if not (path / _MARKER).is_file():
            # Write to a private dir and rename it into place, so parallel sweep jobs never
            # read a half-written cache; a dir without the marker is a crashed write: replace it.
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.build().save_to_disk(str(tmp))
            (tmp / _MARKER).write_text(json.dumps({**self.sizes, "seed": self.seed}))
            if (path / _MARKER).is_file():  # another job finished first
                shutil.rmtree(tmp)
            else:
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
        return datasets.load_from_disk(str(path))
