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
from medvr.rollout.images import encode_unique
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
    one image (`rollouts.image_ids`: the G rows of a prompt) go through the vision tower once.
    """
    n, length = rollouts.input_ids.shape
    start = max(rollouts.policy_start, 1)
    keep = length - start + 1  # logits at [start-1, L) predict tokens [start, L+1)
    inputs = rollouts.model_inputs()
    if rollouts.image_ids is not None:  # each distinct image through the vision tower once (with grad)
        del inputs["pixel_values"]
        inputs |= encode_unique(model, rollouts.pixel_values, rollouts.image_grid_thw, rollouts.image_ids)
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1] / temperature  # [N, L-start, V]
    logits.index_fill_(-1, forbidden_ids.to(logits.device), float("-inf"))  # outputs of div: safe in place
    spots = [(r, c - start, ids) for r, row in enumerate(rollouts.extras.get("allowed", [])) for c, ids in row]
    if spots:  # constrained zoom actions: the sets each token was sampled under (medvr/explore/grammar.py)
        rows, cols, sets = zip(*spots)
        restrict(logits, (torch.tensor(rows), torch.tensor(cols)), list(sets))
    targets = rollouts.input_ids[:, start:]  # [N, L-start]
    logps = torch.zeros(n, length, device=logits.device)
    # observation tokens of multi-turn rollouts (image placeholders) are forbidden to the policy (-inf):
    # keep only policy tokens, so KL and ratios never meet -inf - -inf
    policy = rollouts.loss_mask[:, start:].bool()
    logps[:, start:] = torch.where(policy, selective_log_softmax(logits, targets), 0.0)
    if not with_entropy:
        return logps, None
    entropies = torch.zeros_like(logps)
    with torch.no_grad():
        entropies[:, start:] = entropy_from_logits(logits.detach())
    return logps, entropies
