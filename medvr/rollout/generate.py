"""Batched sampling with exact per-token log-probs, and the training forward that recomputes them.

Both read the policy's RAW logits divided by the temperature (top_k=0, top_p=1, no repetition
penalty): warped scores would give -inf entries, NaN entropies and log-probs that disagree with
the training forward (DESIGN.md, pitfalls). Vision placeholder tokens are forbidden to the policy
(a sampled <|image_pad|> would desynchronise image features and tokens): the policy is the
softmax over the remaining vocabulary, both when sampling and when recomputing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from medvr.grpo import entropy_from_logits, selective_log_softmax
from medvr.rollout.batch import Rollouts
from medvr.rollout.images import base_model, cache_argument, encode_unique, take
from medvr.rollout.sampling import entropy, policy_logprobs, restrict


class NonFiniteError(FloatingPointError):
    """The policy produced NaN or inf where a number was needed (logits while sampling, a loss, a gradient)."""


@dataclass
class Sample:
    tokens: Tensor  # [N, Lc] generated ids, pad after the end
    mask: Tensor  # [N, Lc] 1 up to and including the first stop token (or the end of a stop string)
    logps: Tensor  # [N, Lc] log-prob of each token under softmax(logits / T)
    entropies: Tensor  # [N, Lc] entropy of softmax(logits / T)
    truncated: Tensor  # [N] no stop token within the budget
    stopped_by_string: Tensor  # [N] bool: ended by one of the stop strings (e.g. </zoom>)


class _FirstStop(StoppingCriteria):
    """Stop strings (HF's StopStringCriteria) that also remember the step at which each row first matched."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_len: int, rows: int, device):
        self.inner = StopStringCriteria(tokenizer, stop_strings)
        self.prompt_len = prompt_len
        self.step = torch.full((rows,), -1, dtype=torch.long, device=device)  # [N] -1 = never

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        done = self.inner(input_ids, scores)  # [N]
        first = done & (self.step < 0)
        self.step[first] = input_ids.shape[1] - 1 - self.prompt_len
        return done


def generation_config(*, max_new_tokens: int, stop_ids: list[int], pad_id: int, forbidden_ids: list[int]) -> GenerationConfig:
    """Greedy decoding with no warpers or penalties: a sampled token comes from a logits processor
    (medvr's inverse-CDF choice, `medvr/rollout/engines.py`) that leaves only that token finite."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        suppress_tokens=forbidden_ids,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
    )


@torch.no_grad()
def sample(
    model,
    inputs: dict[str, Tensor],
    config: GenerationConfig,
    temperature: float,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    logits_processor=None,
    allowed: list[dict[int, Tensor]] | None = None,
) -> Sample:
    """One batched `generate` call over every row of `inputs` (all prompts x all completions).

    A row ends at a stop token, or right after any of `stop_strings` (which may span several tokens).
    `allowed` [step] {row: ids}: the action grammar's restrictions (a logits processor fills it while generating).
    """
    prompt_len = inputs["input_ids"].shape[1]
    rows, device = inputs["input_ids"].shape[0], inputs["input_ids"].device
    criteria = [_FirstStop(tokenizer, stop_strings, prompt_len, rows, device)] if stop_strings else []
    out = model.generate(
        **inputs,
        generation_config=config,
        stopping_criteria=StoppingCriteriaList(criteria),
        logits_processor=logits_processor,
    )
    tokens = out.sequences[:, prompt_len:]  # [N, Lc]
    logps, entropies = [], []
    forbidden = torch.tensor(config.suppress_tokens or [], dtype=torch.long, device=tokens.device)
    for t, step_logits in enumerate(out.logits):  # one [N, V] per step: never stack [N, Lc, V]
        # the grammar's restriction of step t (filled while generating), applied as when sampling
        logp = policy_logprobs(step_logits, temperature, forbidden, allowed[t] if allowed else None)  # [N, V]
        logps.append(logp.gather(-1, tokens[:, t : t + 1]).squeeze(-1))  # [N]
        entropies.append(entropy(logp))  # [N]
    logps_t = torch.stack(logps, dim=1)  # [N, Lc]
    entropies_t = torch.stack(entropies, dim=1)  # [N, Lc]
    stop_ids = torch.tensor(config.eos_token_id, device=tokens.device)
    is_stop = torch.isin(tokens, stop_ids)  # [N, Lc]
    ended_before = (is_stop.cumsum(dim=1) - is_stop.long()) > 0  # [N, Lc] a stop token came earlier
    by_string = torch.zeros(rows, dtype=torch.bool, device=device)  # [N]
    if criteria:
        string_end = criteria[0].step  # [N]
        first_stop = torch.where(is_stop.any(dim=1), is_stop.long().argmax(dim=1), tokens.shape[1])  # [N]
        by_string = (string_end >= 0) & (string_end < first_stop)
        cols = torch.arange(tokens.shape[1], device=device)
        ended_before |= by_string.unsqueeze(1) & (cols > string_end.unsqueeze(1))
    mask = (~ended_before).long()  # [N, Lc]
    return Sample(
        tokens=tokens,
        mask=mask,
        logps=logps_t * mask,
        entropies=entropies_t * mask,
        truncated=~(is_stop.any(dim=1) | by_string),
        stopped_by_string=by_string,
    )


def token_logps(
    model, rollouts: Rollouts, temperature: float, forbidden_ids: Tensor, with_entropy: bool = False
):
    """Per-token log-probs (and optionally entropies) of the policy tokens under `model`: [N, L], 0 elsewhere.

    Logits are computed only from the first policy column on (`logits_to_keep`), in one forward
    over the whole multimodal sequence (images, M-RoPE positions from mm_token_type_ids). Copies of
    one image (`rollouts.image_ids`: the G rows of a prompt) go through the vision tower once, and
    the G rows of a prompt share one pass over it (`_shared_prompt_logits`) where their layout allows.
    """
    n, length = rollouts.input_ids.shape
    start = max(rollouts.policy_start, 1)
    inputs = rollouts.model_inputs()
    if rollouts.image_ids is not None:  # each distinct image through the vision tower once (with grad)
        del inputs["pixel_values"]
        inputs |= encode_unique(model, rollouts.pixel_values, rollouts.image_grid_thw, rollouts.image_ids)
    shared = _shared_prompts(model, rollouts)
    if shared is None:  # logits at [start-1, L) predict the tokens of columns [start, L)
        logits = model(**inputs, logits_to_keep=length - start + 1, use_cache=False).logits[:, :-1]
        cols = torch.arange(start, length, device=logits.device).expand(n, -1)
    else:
        logits, cols = _shared_prompt_logits(model, inputs, rollouts.group_size, *shared)
    # cols [N, T]: the column whose token each logits position predicts (>= L: none, padding)
    logits = logits / temperature  # [N, T, V]
    logits.index_fill_(-1, forbidden_ids.to(logits.device), float("-inf"))  # outputs of div: safe in place
    first = cols[:, 0].tolist()
    spots = [(r, c - first[r], ids) for r, row in enumerate(rollouts.extras.get("allowed", [])) for c, ids in row]
    if spots:  # constrained zoom actions: the sets each token was sampled under (medvr/explore/grammar.py)
        rows, at, sets = zip(*spots)
        restrict(logits, (torch.tensor(rows), torch.tensor(at)), list(sets))
    valid = cols < length
    safe = cols.clamp(max=length - 1)
    targets = rollouts.input_ids.gather(1, safe)  # [N, T]
    # observation tokens of multi-turn rollouts (image placeholders) are forbidden to the policy (-inf):
    # keep only policy tokens, so KL and ratios never meet -inf - -inf
    policy = rollouts.loss_mask.gather(1, safe).bool() & valid
    width = cols.shape[1]
    spare = torch.arange(length, length + width, device=cols.device).expand(n, -1)
    dest = torch.where(valid, cols, spare)  # padding positions land past column L, then are cut off
    place = lambda values: values.new_zeros(n, length + width).scatter(1, dest, values)[:, :length]
    logps = place(torch.where(policy, selective_log_softmax(logits, targets), 0.0))
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        entropies = place(torch.where(policy, entropy_from_logits(logits.detach()), 0.0))
    return logps, entropies


def _shared_prompts(model, rollouts: Rollouts) -> tuple | None:
    """(each group's prompt images, every other image, first column, first policy column) when each block of
    `group_size` rows holds one prompt (the same tokens and images before each row's first policy token);
    None otherwise, and under gradient checkpointing (which turns the forward's KV cache off).

    Images are indices into the rollouts' images; columns are per row ([N]): multi-turn trajectories are
    right-aligned, so the same prompt ends at different columns in different rows.
    """
    g, n = rollouts.group_size, len(rollouts)
    inner = base_model(model)
    if g < 2 or n % g or rollouts.image_ids is None or inner.is_gradient_checkpointing:
        return None
    if not rollouts.loss_mask.bool().any(dim=1).all():
        return None
    ends = rollouts.loss_mask.float().argmax(dim=1)  # [N] first policy column
    begins = rollouts.attention_mask.float().argmax(dim=1)  # [N] first real column
    ids, mm = rollouts.input_ids.tolist(), rollouts.mm_token_type_ids
    merge = inner.config.vision_config.spatial_merge_size ** 2
    tokens = (rollouts.image_grid_thw.prod(-1) // merge).tolist()  # placeholders per image
    cols = torch.arange(rollouts.input_ids.shape[1], device=mm.device)
    in_prompt = (mm * (cols < ends.unsqueeze(1))).sum(1).tolist()  # placeholders before the policy, per row
    image_ids = rollouts.image_ids.tolist()
    image, prompt, rest = 0, [], []
    for row, count in enumerate(rollouts.images_per_row.tolist()):
        k, seen = 0, 0
        while k < count and seen < in_prompt[row]:
            seen += tokens[image + k]
            k += 1
        if seen != in_prompt[row]:
            return None
        mine = (ids[row][int(begins[row]) : int(ends[row])], [image_ids[i] for i in range(image, image + k)])
        if row % g == 0:
            lead = mine
            prompt += range(image, image + k)
        elif mine != lead:
            return None
        rest += range(image + k, image + count)
        image += count
    return prompt, rest, begins, ends


def _shared_prompt_logits(model, inputs: dict, g: int, prompt: list[int], rest: list[int], begins: Tensor,
                          ends: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [N, T, V] and the column each predicts [N, T], with each group's prompt run once.

    The prompt of a group's first row goes through the model with its KV cache kept (the prompts of the
    groups left-padded together); the cache is repeated for the group's G rows (with grad: the prompt's
    gradient is the sum over its rows, as with G copies), and every row's tokens from its first policy
    token on (right-padded together) run on top of it, at the M-RoPE positions of the whole sequence.
    """
    ids, mask, mm = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    n, length = ids.shape
    inner = base_model(model)
    pos, _ = inner.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=mask)  # [3, N, L]
    lead = torch.arange(0, n, g, device=ids.device)
    width = int((ends - begins)[lead].max())
    head = ends[lead].unsqueeze(1) - width + torch.arange(width, device=ids.device)  # [B, P] columns
    tail = ends.unsqueeze(1) + torch.arange(length - int(ends.min()), device=ids.device)  # [N, T] columns
    head_ok, tail_ok = head >= 0, tail < length
    head, tail = head.clamp(min=0), tail.clamp(max=length - 1)
    pick = lambda x, rows, at, ok: torch.where(ok, x[rows].gather(1, at), 0)
    head_mask, tail_mask = pick(mask, lead, head, head_ok), pick(mask, slice(None), tail, tail_ok)
    features = inputs["mm_encoder_outputs"]["image"]
    images = lambda index: {"mm_encoder_outputs": {"image": take(features, index)}} if index else {}
    first = model(input_ids=pick(ids, lead, head, head_ok), attention_mask=head_mask,
                  position_ids=pos[:, lead].gather(2, head.expand(3, -1, -1)), use_cache=True, logits_to_keep=1,
                  **images(prompt))
    cache = first.past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(g, dim=0)
        layer.values = layer.values.repeat_interleave(g, dim=0)
    after = model(input_ids=pick(ids, slice(None), tail, tail_ok),
                  attention_mask=torch.cat([head_mask.repeat_interleave(g, dim=0), tail_mask], dim=1),
                  position_ids=pos.gather(2, tail.expand(3, -1, -1)), use_cache=True, **{cache_argument(model): cache},
                  **images(rest))
    logits = torch.cat([first.logits.repeat_interleave(g, dim=0), after.logits[:, :-1]], dim=1)
    return logits, torch.where(tail_ok, tail, length)
