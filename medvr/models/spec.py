"""What to load as the policy, and loading it: hub id or local dir, dtype, LoRA/QLoRA, freezing.

Instantiating a `ModelSpec` is free; `check()` resolves where the weights are (cheap, run before
any expensive work so an unreachable checkpoint fails first) and `load()` builds the model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from pathlib import Path

import torch

from medvr.models.family import Family, by_type, vision_tower

log = logging.getLogger(__name__)


class ModelUnavailableError(RuntimeError):
    """The checkpoint is neither a local directory nor reachable on the hub."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated or unreadable (an interrupted download or save)."""


def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(f"{path} cannot be read as JSON ({err}); {fix}") from err


def _safetensors_size(path: Path) -> int:
    """The file size that the header of a safetensors file implies: 8 + header + the last tensor's end.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range in the data, then the data; only the header is read.
    """
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if 8 + header_size > path.stat().st_size:
            return 8 + header_size  # not even the header is complete
        header = json.loads(f.read(header_size))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_size + max(ends, default=0)


def check_checkpoint_files(directory: Path, fix: str) -> None:
    """Parse config.json and every safetensors header (not the weights); raise on a broken file.

    `fix` says what to do about it, e.g. download the checkpoint again.
    """
    _read_json(directory / "config.json", fix)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, fix).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise CorruptCheckpointError(
                f"{directory}: weight shard(s) {missing} listed in {index.name} are missing; {fix}"
            )
    for weights in sorted(directory.glob("*.safetensors")):
        size = weights.stat().st_size
        try:
            expected = _safetensors_size(weights)
        except (OSError, struct.error, ValueError, LookupError, TypeError, AttributeError) as err:
            raise CorruptCheckpointError(
                f"{weights} ({size} bytes) has no readable safetensors header ({type(err).__name__}: {err}); {fix}"
            ) from err
        if size != expected:
            raise CorruptCheckpointError(
                f"{weights} is {size} bytes but its safetensors header describes {expected} bytes: "
                f"the file is {'truncated' if size < expected else 'corrupt'}; {fix}"
            )


def _auto_dtype(name: str) -> torch.dtype:
    if name == "auto":
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else torch.float32
    return getattr(torch, name)


def _auto_attention(name: str, dtype: torch.dtype) -> str:
    """`auto`: flash-attention 2 where it can run (installed, a CUDA device, a 16-bit dtype), else sdpa."""
    if name != "auto":
        return name
    usable = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    return "flash_attention_2" if usable and dtype in (torch.bfloat16, torch.float16) else "sdpa"


def half_precision_trainable(model) -> dict[torch.dtype, int]:
    """Trainable parameters stored in 16 bits, counted per dtype (elements).

    An optimiser that updates bf16 weights in place loses every update below about 2^-8 of a weight
    (bf16 keeps 8 significant bits): at lr 1e-6 nearly all of them. Full fine-tuning in 16 bits needs
    fp32 master weights: `model.dtype=float32` with `trainer.precision=bf16-mixed` (bf16 compute).
    LoRA adapters are kept in fp32 by peft whatever the base's dtype.
    """
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return counts


class ModelSpec:
    """A Qwen-VL checkpoint (a family of medvr/models/family.py) plus how to train it (full fine-tune, LoRA or QLoRA)."""

    def __init__(
        self,
        name: str,
        hub_id: str | None,
        path: str | None,
        dtype: str,
        attn_implementation: str,
        min_pixels: int,
        max_pixels: int,
        freeze_vision: bool,
        gradient_checkpointing: bool,
        lora: dict | None = None,
        quantization: str | None = None,
        box_scale: int | str | None = None,
        image_factor: int | None = None,
    ):
        self.name = name
        self.box_scale = box_scale  # coordinate convention of zoom boxes (read by the zoom environment)
        self.image_factor = image_factor  # pixels per merged vision token, checked against the processor
        self.hub_id = hub_id
        self.path = path
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.freeze_vision = freeze_vision
        self.gradient_checkpointing = gradient_checkpointing
        self.lora = dict(lora) if lora else None
        self.quantization = quantization

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None

    def check(self) -> str:
        """Return the local directory holding the checkpoint, or raise a clear error.

        Only headers are read: a missing, truncated or unparsable file fails here, in seconds.
        """
        if self.path:
            local = Path(self.path).expanduser()
            if not (local / "config.json").is_file():
                raise ModelUnavailableError(
                    f"model.path={self.path!r} is not a Hugging Face model directory (no config.json "
                    f"there). Point model.path at a directory saved with save_pretrained."
                )
            fix = "copy the checkpoint again, or re-save it with save_pretrained"
            check_checkpoint_files(local, fix)
            self._family(local, fix)
            return str(local)
        if not self.hub_id:
            raise ModelUnavailableError(f"model '{self.name}': set model.hub_id or model.path.")
        local = self._from_hub(self.hub_id)
        fix = f"download it again (`hf download {self.hub_id} --force-download`) or pass model.path=DIR"
        check_checkpoint_files(Path(local), fix)
        self._family(Path(local), fix)
        return local

    def _family(self, local: Path, fix: str) -> Family:
        """The checkpoint's family; an unsupported architecture fails here, before anything is loaded."""
        config = _read_json(local / "config.json", fix)
        return by_type(config.get("model_type"), f"model '{self.name}' ({local / 'config.json'})")

    def _from_hub(self, repo_id: str) -> str:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(repo_id, local_files_only=True)
        except Exception:  # not cached: fall through to the network unless told not to
            pass
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
        try:
            if offline:
                raise ConnectionError("HF_HUB_OFFLINE is set")
            return snapshot_download(repo_id)
        except Exception as exc:
            raise ModelUnavailableError(
                f"model '{self.name}': checkpoint {repo_id!r} is not in the local Hugging Face cache "
                f"and the hub is unreachable ({type(exc).__name__}: {str(exc)[:200]}). Download it "
                f"where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and run with "
                f"model.path=DIR."
            ) from exc

    def load(self):
        """Load (model, processor) ready for training; the model is on CPU."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local = self.check()
        fam = self._family(Path(local), "re-save the checkpoint with save_pretrained")
        processor = AutoProcessor.from_pretrained(local, **fam.processor_kwargs(self.min_pixels, self.max_pixels))
        processor.tokenizer.padding_side = "left"
        self._check_image_factor(processor.image_processor)
        if self.hub_id and self.box_scale != fam.box_scale:
            log.warning(
                "model.box_scale=%s, but %s was pretrained on boxes with box_scale=%s: the policy has to learn "
                "the new convention", self.box_scale, self.hub_id, fam.box_scale,
            )
        dtype = _auto_dtype(self.dtype)
        kwargs = {"dtype": dtype, "attn_implementation": _auto_attention(self.attn_implementation, dtype)}
        if self.quantization is not None:
            kwargs["quantization_config"] = self._quantization_config()
        model = AutoModelForImageTextToText.from_pretrained(local, **kwargs)
        if self.quantization is not None:
            _keep_4bit_weights_trainable(model)
        if self.freeze_vision:
            for p in vision_tower(model).parameters():
                p.requires_grad_(False)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.uses_lora:
            model = self._wrap_lora(model)
        elif self.quantization is not None:
            raise ValueError("model.quantization needs model.lora: a 4-bit base can only train adapters.")
        return model, processor

    def _check_image_factor(self, image_processor) -> None:
        """model.image_factor (what the zoom environment resizes by) must be the processor's patch x merge."""
        actual = image_processor.patch_size * image_processor.merge_size
        if self.image_factor is not None and self.image_factor != actual:
            raise ValueError(
                f"model.image_factor={self.image_factor}, but the image processor of model '{self.name}' resizes to "
                f"multiples of {actual} px (patch {image_processor.patch_size} x merge {image_processor.merge_size}): "
                f"set model.image_factor={actual}"
            )

    def _quantization_config(self):
        from transformers import BitsAndBytesConfig

        if self.quantization != "nf4":
            raise ValueError(f"model.quantization={self.quantization!r}: only 'nf4' (QLoRA) or null.")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_auto_dtype(self.dtype),
        )

    def _wrap_lora(self, model):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if self.quantization is not None:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=self.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        config = LoraConfig(task_type="CAUSAL_LM", **self.lora)
        return get_peft_model(model, config)


def _keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) converts a Linear4bit's weights, once and for
    good, the first time it runs in eval mode on an input without grad (as when sampling): the
    block scales are rounded to bf16 and later forwards take a kernel with no backward, so after
    the first rollout gradients stop at every 4-bit layer (layers with a bias raise instead) and
    the policy that sampled is not the one the training forward scores.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
