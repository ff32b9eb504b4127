"""The embedded offline default: a tiny Qwen2-VL built, warm-started and cached by medvr itself.

Nothing is downloaded. The build trains a BPE tokenizer on the synthetic corpus, initialises a
`Qwen2VLForConditionalGeneration` of about 0.95M parameters, pretrains its vision tower and teaches
it the answer format for a few hundred steps, so GRPO starts from a policy whose group rewards vary.
The result is a standard HF directory, verified by a hash manifest and rebuilt if corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from medvr.models.spec import ModelSpec
from medvr.prompts import PromptBuilder

log = logging.getLogger(__name__)

MANIFEST = "medvr_build.json"
BUILD_VERSION = 6


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CachedBuild(ModelSpec):
    """A checkpoint medvr builds itself into `build_dir`, once: verified by a hash manifest, rebuilt if corrupt.

    Subclasses set `build_dir` (named by a hash of what the build depends on) and `params`, and write
    the checkpoint in `_build_into`.
    """

    build_dir: Path
    params: dict

    def check(self) -> str:
        # jobs started together (a launcher's array on a fresh cache) build it once; the others wait for it
        self.build_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.build_dir}.lock"):
            if not self.is_valid(self.build_dir):
                self.build()
        return str(self.build_dir)

    @staticmethod
    def is_valid(directory: Path) -> bool:
        """True when the manifest exists and every file it lists has the recorded hash."""
        manifest = directory / MANIFEST
        if not manifest.is_file():
            return False
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError):
            return False
        return all((directory / n).is_file() and _sha256(directory / n) == h for n, h in files.items())

    def build(self) -> None:
        """Build into a temporary directory, then move it into place (no half-written cache)."""
        log.info("building model '%s' in %s (once; cached afterwards)", self.name, self.build_dir)
        cache = self.build_dir.parent
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=cache))
        try:
            self._build_into(tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"params": self.params, "files": files}, indent=1))
            if self.build_dir.exists():
                shutil.rmtree(self.build_dir)
            tmp.rename(self.build_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _build_into(self, directory: Path) -> None:
        raise NotImplementedError


class TinyQwen2VL(CachedBuild):
    """`model=tiny`: builds (once) and loads the offline Qwen2-VL-architecture model."""

    def __init__(
        self,
        cache_dir: str,
        seed: int,
        vocab_size: int,
        text: dict,
        vision: dict,
        warm_start: dict,
        vision_pretraining: dict,
        prompt: PromptBuilder,
        **spec,
    ):
        super().__init__(hub_id=None, path=None, **spec)
        self.cache_dir = Path(cache_dir)
        self.prompt = prompt
        self.params = {
            "version": BUILD_VERSION,
            "seed": seed,
            "vocab_size": vocab_size,
            "text": dict(text),
            "vision": dict(vision),
            "warm_start": dict(warm_start),
            "vision_pretraining": dict(vision_pretraining),
            "prompt": {
                "template": prompt.templates["choice"],  # the warm start asks choice questions only
                **{k: getattr(prompt, k) for k in ("system", "zoom_system", "observation", "invalid_observation")},
            },
            "pixels": [self.min_pixels, self.max_pixels],
            "box_scale": self.box_scale,
        }
        key = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        self.build_dir = self.cache_dir / f"tiny-qwen2vl-{key}"

    def _build_into(self, directory: Path) -> None:
        from medvr.models.tiny_build import build_tiny

        build_tiny(directory, self.params, self.prompt)
