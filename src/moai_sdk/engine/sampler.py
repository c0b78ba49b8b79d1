"""The engine's sampler: one decoding-core step (:mod:`moai_sdk.modeling.decoding`) over rows with their own settings.

Each row keeps its own :class:`~moai_sdk.modeling.GenerationSettings`, its own seeded :class:`torch.Generator`
(seeded like ``MoAIPipeline.__call__`` seeds its one generator, so a sampling row draws exactly what
``pipe(image, prompt, seed=...)`` draws), the tokens it has seen (for its repetition penalty), its optional
:class:`~moai_sdk.modeling.decoding.TokenConstraint` and how many log-probabilities it wants. The sampler turns a
step's logits [rows, vocab] into one token per row with :func:`~moai_sdk.modeling.decoding.next_tokens` and,
for the rows that asked, records :func:`~moai_sdk.modeling.decoding.row_logprobs`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch

from ..modeling.decoding import SamplingParams, TokenConstraint, TokenLogprobs, next_tokens, row_logprobs
from ..modeling.generation import GenerationSettings


class SamplingRow(Protocol):
    settings: GenerationSettings
    generator: Optional[torch.Generator]
    seen: Optional[torch.Tensor]
    constraint: Optional[TokenConstraint]
    logprobs: Optional[int]


def row_generator(settings: GenerationSettings, device: Any) -> Optional[torch.Generator]:
    """The generator a sampling row draws from, seeded as the pipeline seeds a call's generator."""
    if not settings.do_sample:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    return generator


class Sampler:
    """Chooses the next token of every running row (module docstring)."""

    def __init__(self, vocab_size: int, device: Any) -> None:
        self.vocab_size = vocab_size
        self.device = device

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[list[int], list[Optional[TokenLogprobs]]]:
        """Tokens (host ints) and log-probability records (None for rows that did not ask) for ``rows``."""
        params = SamplingParams.per_row([r.settings for r in rows], logits.device)
        seen = None
        if params.penalizes:
            blank = torch.zeros(self.vocab_size, dtype=torch.bool, device=logits.device)
            seen = torch.stack([r.seen if r.seen is not None else blank for r in rows])
        sampling = any(r.settings.do_sample for r in rows)
        generators = [r.generator for r in rows] if sampling else None
        constraints = [r.constraint for r in rows] if any(r.constraint is not None for r in rows) else None
        tokens = next_tokens(logits, params, seen=seen, generator=generators, constraints=constraints)
        asks = [r.logprobs for r in rows]
        records = row_logprobs(logits, tokens, asks) if any(k is not None for k in asks) else [None] * len(rows)
        host = tokens.tolist()
        for row, token in zip(rows, host):
            if row.seen is not None:
                row.seen[token] = True
            if row.constraint is not None:
                row.constraint.accept(int(token))
        return host, records


__all__ = ["Sampler", "SamplingRow", "row_generator"]
