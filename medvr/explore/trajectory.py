"""One trajectory of a multi-turn rollout, grown segment by segment, and the batch assembled from many.

Segments are prompt (loss 0), policy (loss 1), forced (tokens the trigger inserted, loss 0) and
observation (the environment's turn with the crop, loss 0). The assembled row keeps them in
order, so the training forward sees exactly the sequence the policy was sampled in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from medvr.rollout.batch import Rollouts


@dataclass
class Zoom:
    action: str  # action text, from <zoom> to </zoom>
    span: tuple[int, int]  # [start, stop) token positions of the action in the trajectory's row
    forced: bool  # inserted by a trigger (EVR, random_crop) rather than started by the model
    entropy: float | None = None  # policy entropy at the trigger position
    box: tuple[int, int, int, int] | None = None  # crop box in original-image pixels; None if invalid
    error: str | None = None  # why the action was rejected


@dataclass
class Trajectory:
    record: dict
    prompt_len: int
    ids: list[Tensor] = field(default_factory=list)
    mm: list[Tensor] = field(default_factory=list)
    loss: list[Tensor] = field(default_factory=list)
    logps: list[Tensor] = field(default_factory=list)
    entropies: list[Tensor] = field(default_factory=list)
    pixels: list[Tensor] = field(default_factory=list)  # per image [p, D], turn order
    grids: list[Tensor] = field(default_factory=list)  # per image [3]
    crops: list[Image.Image] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # decoded policy and forced text
    zooms: list[Zoom] = field(default_factory=list)
    policy_tokens: int = 0
    triggers: int = 0
    done: bool = False
    truncated: bool = False  # ended by the token budget or the turn limit
    over_turn: bool = False  # ended by the turn limit
    masked: bool = False  # excluded from the loss (over-turn masking)
    can_trigger: bool = True  # False for the un-regrounded twin of a branched rollout
    in_action: bool = False  # a forced `<zoom>[` waits for the model's box
    pending: Zoom | None = None
    slot: int = 0  # row of the rollout's `Noise` this trajectory samples with
    cache: object = None  # the rollout engine's state for the next turn (e.g. a KV cache)
    allowed: list[tuple[int, Tensor]] = field(default_factory=list)  # (position, ids) of constrained tokens

    @classmethod
    def from_prompts(cls, enc: dict[str, Tensor], records: list[dict]) -> list[Trajectory]:
        """One trajectory per row of `encode_prompts` output, with that row's images."""
        pixels = torch.split(enc["pixel_values"].cpu(), enc["image_grid_thw"].prod(-1).tolist())
        first = [0, *enc["images_per_row"].cumsum(0).tolist()]
        shared: dict[tuple[int, int], Tensor] = {}  # rows of one record share its image tensors (encoded once)
        out = []
        for r, record in enumerate(records):
            keep = enc["attention_mask"][r].bool().cpu()
            ids = enc["input_ids"][r].cpu()[keep]
            t = cls(record=record, prompt_len=len(ids))
            t.add(ids, enc["mm_token_type_ids"][r].cpu()[keep], loss=0)
            for j, image in enumerate(range(first[r], first[r + 1])):
                t.pixels.append(shared.setdefault((id(record), j), pixels[image]))
                t.grids.append(enc["image_grid_thw"][image].cpu())
            out.append(t)
        return out

    @property
    def length(self) -> int:
        return sum(len(s) for s in self.ids)

    def all_ids(self) -> Tensor:
        return torch.cat(self.ids)

    def all_mm(self) -> Tensor:
        return torch.cat(self.mm)

    def add(self, ids: Tensor, mm: Tensor, loss: int, logps: Tensor | None = None, ents: Tensor | None = None):
        zeros = torch.zeros(len(ids))
        self.ids.append(ids.long())
        self.mm.append(mm.long())
        self.loss.append(torch.full((len(ids),), loss, dtype=torch.long))
        self.logps.append(zeros if logps is None else logps.float())
        self.entropies.append(zeros if ents is None else ents.float())

    def add_policy(self, tokens: Tensor, logps: Tensor, entropies: Tensor, tokenizer,
                   allowed: dict[int, Tensor] | None = None) -> None:
        """Append a turn's policy tokens; `allowed` {index: ids} are the grammar's restrictions they were sampled under."""
        self.allowed += [(self.length + i, ids) for i, ids in (allowed or {}).items()]
        self.add(tokens, torch.zeros_like(tokens), loss=1, logps=logps, ents=entropies)
        self.text.append(tokenizer.decode(tokens, skip_special_tokens=True))
        self.policy_tokens += len(tokens)

    def add_forced(self, ids: list[int], text: str) -> None:
        ids_t = torch.tensor(ids, dtype=torch.long)
        self.add(ids_t, torch.zeros_like(ids_t), loss=0)
        self.text.append(text)

    def add_observation(self, ids: Tensor, mm: Tensor, image: tuple[Tensor, Tensor] | None, crop) -> None:
        self.add(ids, mm, loss=0)
        if image is not None:
            self.pixels.append(image[0])
            self.grids.append(image[1])
            self.crops.append(crop)

    def copy(self) -> Trajectory:
        twin = copy.copy(self)
        for name in ("ids", "mm", "loss", "logps", "entropies", "pixels", "grids", "crops", "text", "zooms", "allowed"):
            setattr(twin, name, list(getattr(self, name)))
        return twin


def assemble(trajs: list[Trajectory], pad_id: int, group_size: int, device) -> Rollouts:
    """Left-pad every trajectory into one `Rollouts` batch; zoom spans move with the padding."""
    width = max(t.length for t in trajs)

    def pad(parts: list[list[Tensor]], value) -> Tensor:
        rows = [torch.cat(p) for p in parts]
        return pad_sequence(rows, batch_first=True, padding_value=value, padding_side="left").to(device)

    ids = pad([t.ids for t in trajs], pad_id)
    loss = pad([t.loss for t in trajs], 0)
    loss[torch.tensor([t.masked for t in trajs], device=device)] = 0
    shift = [width - t.length for t in trajs]
    zooms = [[replace(z, span=(z.span[0] + s, z.span[1] + s)) for z in t.zooms] for t, s in zip(trajs, shift)]
    return Rollouts(
        input_ids=ids,
        attention_mask=pad([[torch.ones(t.length, dtype=torch.long)] for t in trajs], 0),
        mm_token_type_ids=pad([t.mm for t in trajs], 0),
        loss_mask=loss,
        gen_logps=pad([t.logps for t in trajs], 0.0),
        entropies=pad([t.entropies for t in trajs], 0.0),
        truncated=torch.tensor([t.truncated for t in trajs], device=device),
        pixel_values=torch.cat([p for t in trajs for p in t.pixels]).to(device),
        image_grid_thw=torch.stack([g for t in trajs for g in t.grids]).to(device),
        images_per_row=torch.tensor([len(t.grids) for t in trajs], device=device),
        image_ids=_image_ids(trajs),
        completions=["".join(t.text).strip() for t in trajs],
        group_size=group_size,
        extras={"zooms": zooms, "crops": [list(t.crops) for t in trajs],
                # constrained tokens' allowed ids, at their padded columns: token_logps restricts them alike
                "allowed": [[(c + s, ids) for c, ids in t.allowed] for t, s in zip(trajs, shift)]},
    )


def _image_ids(trajs: list[Trajectory]) -> Tensor:
    """[I] one id per distinct image tensor: the G rows of a prompt (and branched twins) share theirs."""
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(id(p), len(ids)) for t in trajs for p in t.pixels])
