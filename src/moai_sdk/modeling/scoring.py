"""Scoring continuations: the log-probability MoAI gives each of several continuations of a prompt.

One prefill per prompt (a left-padded batch of prompts), then the prompt's cached keys/values are copied once per
continuation and all continuations run as one right-padded forward over the cache. Every continuation token is
computed the way generation computes it -- a cached step, where (as in the released model) neither the MoAI-Mixer
nor PLoRA runs -- so a continuation's score is the log-probability that greedy decoding or sampling assigns to
producing exactly those tokens, and ``is_greedy`` says whether greedy decoding would.

A single forward over prompt + continuation would give other numbers: in a mixer layer the image tokens attend
to every text token (``CA_img_lang``) in both directions, so the prompt's states would depend on the
continuation, which is not what the model computes while answering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .generation import check_context_length
from .internlm2 import KVCache


@dataclass
class ContinuationLogprobs:
    """``token_logprobs[j]``: log p(token j | prompt, tokens before j) in float32; ``is_greedy``: every token
    is the arg-max of its distribution."""

    token_ids: list[int]
    token_logprobs: list[float]
    is_greedy: bool

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))


@torch.inference_mode()
def score_continuations(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    image_features: torch.Tensor,
    compressed_aux: torch.Tensor,
    im_mask: torch.Tensor | None = None,
    lang_mask: torch.Tensor | None = None,
) -> list[list[ContinuationLogprobs]]:
    """Per prompt row of ``input_ids`` (left-padded, one ``<image>`` each), per continuation (token ids), the
    per-token log-probabilities. The image features and compressed auxiliary tokens are the prompts' (see
    :meth:`~moai_sdk.modeling.MoAIForCausalLM.encode_images` and ``compress``)."""
    b = input_ids.shape[0]
    if len(continuations) != b:
        raise InputError(f"{b} prompts but {len(continuations)} lists of continuations")
    vocab = model.config.vocab_size
    for conts in continuations:
        for ids in conts:
            if any(not 0 <= int(t) < vocab for t in ids):
                raise InputError(f"continuation token ids must lie in 0..{vocab - 1}; got {list(ids)}")
    longest = max((len(c) for conts in continuations for c in conts), default=0)
    device = model.device
    n_image = model.config.structure.num_patches
    prompt_tokens = int(attention_mask.sum(-1).max()) - 1
    check_context_length(prompt_tokens, n_image, max(longest, 1), model.config)

    # 1. one prefill per prompt
    cache = KVCache.allocate(model.config, b, input_ids.shape[1] - 1 + n_image + longest, model.dtype, device)
    out = model(
        input_ids.to(device),
        attention_mask=attention_mask.to(device),
        im_mask=im_mask,
        lang_mask=lang_mask,
        image_features=image_features,
        compressed_aux=compressed_aux,
        cache=cache,
        last_logits_only=True,
    )
    first_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: the first continuation token
    rows = [i for i, conts in enumerate(continuations) for c in conts if len(c)]
    results: list[list[ContinuationLogprobs]] = [[] for _ in range(b)]
    if rows and longest:
        # 2. the prompt's cache copied once per (non-empty) continuation; all of them in one forward
        index = torch.tensor(rows, device=device)
        cache.reorder(index)
        cache.length = out.attention_mask.shape[1]
        flat = [list(c) for conts in continuations for c in conts if len(c)]
        tokens = torch.full((len(flat), longest), model.config.pad_token_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(flat), longest, dtype=torch.long, device=device)
        for r, ids in enumerate(flat):
            tokens[r, : len(ids)] = torch.tensor(ids, device=device)
            valid[r, : len(ids)] = 1
        mask = torch.cat((out.attention_mask.index_select(0, index), valid), dim=1)
        logits = model(tokens, attention_mask=mask, cache=cache).logits.float()  # [R, L, V]
        # the distribution of token j: the prompt's last position for j = 0, continuation position j - 1 after
        logprobs = torch.cat((first_logprobs.index_select(0, index)[:, None], F.log_softmax(logits[:, :-1], -1)), 1)
        picked = logprobs.gather(-1, tokens[..., None]).squeeze(-1)
        greedy = (logprobs.argmax(-1) == tokens) | (valid == 0)
        picked_h, greedy_h = picked.tolist(), greedy.all(-1).tolist()
    r = 0
    for i, conts in enumerate(continuations):
        for c in conts:
            if not len(c):
                results[i].append(ContinuationLogprobs([], [], True))
                continue
            n = len(c)
            results[i].append(ContinuationLogprobs([int(t) for t in c], picked_h[r][:n], bool(greedy_h[r])))
            r += 1
    return results


__all__ = ["ContinuationLogprobs", "score_continuations"]
