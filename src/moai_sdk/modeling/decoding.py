"""The decoding core: one implementation of logits processing, token choice, stop handling and answer cutting.

Both :func:`moai_sdk.modeling.generation.generate` (a batch that shares one set of settings) and the
continuous-batching engine (:mod:`moai_sdk.engine`, where every row has its own settings) choose tokens here:

* :class:`SamplingParams` -- the per-row knobs of a batch (repetition penalty, temperature, top-k, top-p, greedy or
  sampling), as Python numbers when every row shares them (the fast path ``generate`` takes) or as ``[B, 1]``
  tensors when rows differ;
* :func:`next_tokens` -- one step: repetition penalty, the rows' :class:`TokenConstraint` masks, then greedy
  arg-max or temperature / top-k / top-p sampling with either one generator for the batch (``generate``) or one
  seeded :class:`torch.Generator` per row (the engine: a seeded row draws exactly what its single run draws);
  with ``logprobs`` it records, from the *raw* logits, the chosen token's log-probability and the top
  alternatives (:class:`TokenLogprobs`);
* :class:`StopCriteria` -- when a row ends: EOS ids, stop strings (on the decoded text), a constraint that
  terminated, its own ``max_new_tokens``; :func:`cut_answer` -- where the answer text ends (the official demo's
  ``"[U"`` cut and the stop strings).

Order of the logits processing (as transformers and the official demo): repetition penalty, the constraint mask
(disallowed tokens -> ``-inf``; EOS is allowed only where the mask allows it), then for sampling rows
temperature, top-k, top-p and the draw; greedy rows take the arg-max after the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from ..errors import GenerationError

#: The official demo cuts the decoded answer at the first occurrence of this text (InternLM2 chat markers).
ANSWER_CUT = "[U"

#: Most alternatives a row may ask log-probabilities for (OpenAI's ``top_logprobs`` bound).
MAX_LOGPROBS = 20

Number = Union[float, int]


def cut_answer(text: str, stop: Sequence[str] = ()) -> str:
    """``text`` up to the first :data:`ANSWER_CUT` or stop string (whichever comes first)."""
    cut = len(text)
    for marker in (ANSWER_CUT, *stop):
        if marker:
            pos = text.find(marker)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


def hit_stop_string(decode: Callable[[list[int]], str], tokens: list[int], stops: Sequence[str]) -> bool:
    """Whether the text of ``tokens`` contains one of ``stops``."""
    if not stops:
        return False
    text = decode(tokens)
    return any(s in text for s in stops)


@runtime_checkable
class TokenConstraint(Protocol):
    """What a row's constraint (a grammar / JSON-schema matcher) offers the core, one call per step."""

    def allowed_tokens(self, vocab_size: int, device: Any) -> Optional[torch.Tensor]:
        """A bool ``[vocab]`` tensor (True = allowed) for the next token, or ``None`` for "all allowed"."""

    def accept(self, token_id: int) -> None:
        """Advance the matcher with the chosen token."""

    def is_terminated(self) -> bool:
        """The matcher finished: the row ends (finish reason ``"stop"``)."""


@dataclass
class TokenLogprobs:
    """One step's log-probabilities of a row, from its raw logits (before penalties, mask and temperature)."""

    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- processors
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Any) -> torch.Tensor:
    """``seen`` [B, V] bool: divide positive / multiply negative logits of already seen tokens by ``penalty``
    (a number, or a [B, 1] tensor of per-row penalties)."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def warp_for_sampling(logits: torch.Tensor, s: Any) -> torch.Tensor:
    """Temperature, top-k and top-p of settings ``s`` (a ``GenerationSettings`` or :class:`SamplingParams`; its
    fields numbers, or [B, 1] tensors for per-row values -- ``top_k`` 0 and ``top_p`` 1 switch a row's filter off)."""
    temperature, top_k, top_p = s.temperature, s.top_k, s.top_p
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if isinstance(top_k, torch.Tensor):
        k = top_k.clamp(0, vocab)
        if bool((k > 0).any()):
            sorted_desc = torch.sort(logits, descending=True, dim=-1).values
            kth = sorted_desc.gather(-1, (k - 1).clamp_min(0))
            kth = torch.where(k > 0, kth, torch.full_like(kth, float("-inf")))
            logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_k > 0:
        k = min(top_k, vocab)
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        if isinstance(top_p, torch.Tensor):
            # the per-row cut 1 - top_p, computed in double then rounded once (as a single row's scalar is)
            remove_sorted = (cum <= s.top_p_cut) & (top_p < 1.0)
        else:
            remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@dataclass
class SamplingParams:
    """The knobs of one decoding step for a batch of rows: numbers (shared by every row) or [B, 1] tensors."""

    do_sample: Any = False  # bool, or a [B] bool tensor
    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    repetition_penalty: Any = 1.0
    #: With per-row ``top_p``: the float32 [B, 1] tensor of ``1 - top_p`` (computed in double precision).
    top_p_cut: Any = None

    @classmethod
    def shared(cls, settings: Any) -> SamplingParams:
        """One set of settings (a ``GenerationSettings``) for every row."""
        return cls(
            bool(settings.do_sample),
            settings.temperature,
            settings.top_k,
            settings.top_p,
            settings.repetition_penalty,
        )

    @classmethod
    def per_row(cls, rows: Sequence[Any], device: Any) -> SamplingParams:
        """Each row's own settings; numbers where all rows agree (so a uniform batch takes the fast path)."""
        if not rows:
            raise GenerationError("a decoding step needs at least one row")

        def column(name: str, dtype: torch.dtype) -> Any:
            values = [getattr(r, name) for r in rows]
            if all(v == values[0] for v in values):
                return values[0]
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        sample = [bool(r.do_sample) for r in rows]
        do_sample: Any = sample[0] if all(v == sample[0] for v in sample) else torch.tensor(sample, device=device)
        top_p = column("top_p", torch.float32)
        cut = None
        if isinstance(top_p, torch.Tensor):
            cut = torch.tensor([1 - r.top_p for r in rows], dtype=torch.float32, device=device)[:, None]
        return cls(
            do_sample,
            column("temperature", torch.float32),
            column("top_k", torch.long),
            top_p,
            column("repetition_penalty", torch.float32),
            cut,
        )

    def rows(self, index: torch.Tensor) -> SamplingParams:
        """The parameters of the rows ``index`` (1-D LongTensor)."""

        def pick(v: Any) -> Any:
            return v.index_select(0, index) if isinstance(v, torch.Tensor) else v

        return SamplingParams(
            pick(self.do_sample),
            pick(self.temperature),
            pick(self.top_k),
            pick(self.top_p),
            pick(self.repetition_penalty),
            pick(self.top_p_cut),
        )

    @property
    def penalizes(self) -> bool:
        """Whether any row has a repetition penalty (only then is the ``seen`` mask kept up to date)."""
        p = self.repetition_penalty
        return bool((p != 1.0).any()) if isinstance(p, torch.Tensor) else p != 1.0


def _constraint_mask(
    constraints: Sequence[Optional[TokenConstraint]], vocab: int, device: Any
) -> Optional[torch.Tensor]:
    """[B, V] bool of allowed tokens, or None when no row is constrained this step."""
    masks = [c.allowed_tokens(vocab, device) if c is not None else None for c in constraints]
    if all(m is None for m in masks):
        return None
    allowed = torch.ones(len(masks), vocab, dtype=torch.bool, device=device)
    for i, m in enumerate(masks):
        if m is not None:
            m = torch.as_tensor(m, device=device)
            if m.dtype != torch.bool or m.shape != (vocab,):
                raise GenerationError(
                    f"a TokenConstraint must return a bool tensor of shape [{vocab}] (or None); got "
                    f"{m.dtype} {tuple(m.shape)}"
                )
            if not bool(m.any()):
                raise GenerationError("the row's TokenConstraint allows no token at all")
            allowed[i] = m
    return allowed


def row_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, k: Sequence[Optional[int]]
) -> list[Optional[TokenLogprobs]]:
    """The chosen tokens' log-probabilities and each asking row's top-``k`` alternatives from raw ``logits``."""
    want = [i for i, n in enumerate(k) if n is not None]
    out: list[Optional[TokenLogprobs]] = [None] * len(k)
    if not want:
        return out
    idx = torch.tensor(want, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, idx)[:, None]).squeeze(1).tolist()
    top_n = max(int(k[i]) for i in want)
    top_v, top_i = logp.topk(top_n, dim=-1) if top_n > 0 else (logp[:, :0], logp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    ids = tokens.index_select(0, idx).tolist()
    for j, i in enumerate(want):
        n = int(k[i])
        out[i] = TokenLogprobs(int(ids[j]), float(chosen[j]), [int(t) for t in top_i[j][:n]], top_v[j][:n])
    return out


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seen: Optional[torch.Tensor] = None,
    generator: Union[torch.Generator, Sequence[Optional[torch.Generator]], None] = None,
    constraints: Optional[Sequence[Optional[TokenConstraint]]] = None,
) -> torch.Tensor:
    """Choose each row's next token from its float32 ``logits`` [B, V].

    ``seen`` [B, V] bool marks the tokens each row has seen (prompt and answer; needed with a repetition
    penalty); ``generator`` is one generator for the whole batch (one batched draw) or one per row (each
    sampling row draws from its own, exactly as a single run of that row would); ``constraints`` one optional
    :class:`TokenConstraint` per row. Returns the token ids [B] (on the logits' device).
    """
    scores = logits
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    if constraints is not None:
        allowed = _constraint_mask(constraints, scores.shape[-1], scores.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
    sample = params.do_sample
    if isinstance(sample, bool):
        if not sample:
            return scores.argmax(-1)
        return _draw(scores, params, generator)
    greedy = scores.argmax(-1)
    idx = sample.nonzero().squeeze(1)
    drawn = _draw(scores.index_select(0, idx), params.rows(idx), _pick_generators(generator, idx))
    return greedy.index_copy(0, idx, drawn)


def _pick_generators(generator: Any, idx: torch.Tensor) -> Any:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in idx.tolist()]


def _draw(scores: torch.Tensor, params: SamplingParams, generator: Any) -> torch.Tensor:
    probs = warp_for_sampling(scores, params).softmax(-1)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    rows = [torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)]
    return torch.cat(rows).squeeze(-1)


def seen_from_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] bool: the text tokens of each prompt (padding and the ``<image>`` placeholder left out), where a
    repetition penalty starts from."""
    seen = torch.zeros(input_ids.shape[0], vocab + 1, dtype=torch.bool, device=input_ids.device)
    valid = attention_mask.bool() & (input_ids < vocab) & (input_ids >= 0)
    # the left-out positions write into a spare last column: sent to id 0 they could clear a seen token 0 (the
    # <image> placeholder follows the prompt's first text tokens)
    seen.scatter_(1, torch.where(valid, input_ids, vocab), True)
    return seen[:, :vocab].contiguous()


def eos_ids(settings: Any, default_eos: int) -> list[int]:
    """The EOS ids of ``settings`` (``eos_token_id``: None = the model's, an int, or a list -- ``[]`` = never)."""
    eos = settings.eos_token_id
    if eos is None:
        return [int(default_eos)]
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


class StopCriteria:
    """When one row ends: an EOS id, a stop string in its decoded text, its constraint terminated, or
    ``max_new_tokens`` generated. :meth:`check` returns ``"stop"``, ``"length"`` or ``None`` (go on)."""

    def __init__(
        self,
        eos: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        decode: Optional[Callable[[list[int]], str]] = None,
    ) -> None:
        if stop and decode is None:
            raise GenerationError("stop strings need a decode function (pass decode=tokenizer.decode)")
        self.eos = frozenset(int(e) for e in eos)
        self.max_new_tokens = int(max_new_tokens)
        self.stop = tuple(stop)
        self.decode = decode

    def check(self, tokens: list[int], constraint: Optional[TokenConstraint] = None) -> Optional[str]:
        if tokens and tokens[-1] in self.eos:
            return "stop"
        if self.stop and hit_stop_string(self.decode, tokens, self.stop):
            return "stop"
        if constraint is not None and constraint.is_terminated():
            return "stop"
        if len(tokens) >= self.max_new_tokens:
            return "length"
        return None


def finish_reason(text: str, tokens: list[int], max_new_tokens: int, stop: Sequence[str], eos: Sequence[int]) -> str:
    """``"stop"`` when an answer ended by itself (EOS, a stop string, the chat marker cut), else ``"length"``;
    ``text`` is the decoded, uncut answer."""
    if len(tokens) < max_new_tokens or (tokens and tokens[-1] in set(eos)):
        return "stop"
    return "stop" if len(cut_answer(text, stop)) < len(text) else "length"


__all__ = [
    "ANSWER_CUT",
    "MAX_LOGPROBS",
    "SamplingParams",
    "StopCriteria",
    "TokenConstraint",
    "TokenLogprobs",
    "apply_repetition_penalty",
    "cut_answer",
    "eos_ids",
    "finish_reason",
    "hit_stop_string",
    "next_tokens",
    "row_logprobs",
    "seen_from_prompt",
    "warp_for_sampling",
]
