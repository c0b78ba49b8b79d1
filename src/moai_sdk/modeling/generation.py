"""Decoding for `MoAIForCausalLM`: greedy, sampling and beam search over a static KV cache.

The prompt is prefilled once (vision tower, compressor, mixer and PLoRA all run there); every later step feeds
only the newest token, for which -- as in the released model -- neither the mixer nor PLoRA run. The
attention mask grows by a one per step; rotary positions continue each row's own count.

Logit processing follows the usual order: repetition penalty, then temperature, top-k and top-p. Beam search
scores hypotheses by the sum of log-probabilities divided by (new tokens) ** length_penalty and stops early
the way transformers' default beam search does (``early_stopping=False``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import synchronize
from ..errors import GenerationError, InputError
from .decoding import (
    MAX_LOGPROBS,
    SamplingParams,
    TokenConstraint,
    TokenLogprobs,
    apply_repetition_penalty,
    hit_stop_string,
    next_tokens,
    row_logprobs,
    seen_from_prompt,
    warp_for_sampling,
)
from .decoding import (
    eos_ids as _eos_list,
)
from .internlm2 import KVCache

logger = logging.getLogger(__name__)


#: Upper bound of ``max_new_tokens`` when the model's context window is not known (a guard against values such
#: as 10**9 reaching the allocator); :func:`generate` bounds it by the model's window.
MAX_NEW_TOKENS_LIMIT = 1 << 20

#: Most beams beam search accepts (each beam is a full copy of the KV cache).
MAX_NUM_BEAMS = 64


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise GenerationError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _as_int(name: str, value: Any, low: int, high: int | None, high_name: str, hint: str = "") -> int:
    """An integer option (numpy integers accepted; bool and float are not integers) within [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise GenerationError(f"{name} must be an integer{hint}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high:,} ({high_name})" if high is not None else f">= {low}"
        raise GenerationError(f"{name} must be {bound}{hint}, got {value:,}")
    return value


def _as_float(name: str, value: Any) -> float:
    """A real-number option: int or float (numpy too), not bool, finite."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GenerationError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value}")
    return value


def _as_stop_list(stop: Any) -> list[str]:
    """``stop`` as a list of non-empty strings (``None`` = none, one string = one stop string)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise GenerationError("stop strings must not be empty (an empty string would stop after the first token)")
    for s in stop:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise GenerationError(f"stop string {s!r} is not valid Unicode text: {exc}") from exc
    return list(stop)


@dataclass
class GenerationSettings:
    """How to decode. Defaults: greedy, 256 new tokens, stop at EOS."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    #: Decode with fixed-shape steps (mask over the whole cache, cache slot chosen on the device) replayed as
    #: a CUDA graph on CUDA devices, which removes the per-step kernel-launch cost; elsewhere the same steps
    #: run without a graph. Greedy and sampling only (beam search reorders the cache and decodes as usual).
    cuda_graphs: bool = False

    def validate(self, *, window: int | None = None) -> GenerationSettings:
        """Check every option's type and range (bool is not an int, floats must be finite); normalise ``stop``.

        ``window`` (the model's context window, when known) bounds ``max_new_tokens``; without it the bound is
        :data:`MAX_NEW_TOKENS_LIMIT`. Raises :class:`~moai_sdk.GenerationError` naming the option.
        """
        self.do_sample = _as_bool("do_sample", self.do_sample)
        self.cuda_graphs = _as_bool("cuda_graphs", self.cuda_graphs)
        limit = MAX_NEW_TOKENS_LIMIT if window is None else min(int(window), MAX_NEW_TOKENS_LIMIT)
        where = "the model's context window" if window is not None else "MAX_NEW_TOKENS_LIMIT"
        self.max_new_tokens = _as_int("max_new_tokens", self.max_new_tokens, 1, limit, where)
        self.top_k = _as_int("top_k", self.top_k, 0, None, "", hint=" (0 = off)")
        self.num_beams = _as_int("num_beams", self.num_beams, 1, MAX_NUM_BEAMS, "MAX_NUM_BEAMS")
        self.temperature = _as_float("temperature", self.temperature)
        self.top_p = _as_float("top_p", self.top_p)
        self.length_penalty = _as_float("length_penalty", self.length_penalty)
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        if self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams > 1 and self.do_sample:
            raise GenerationError(
                "beam sampling is not supported: use num_beams=1 with do_sample=True, or do_sample=False"
            )
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed, 0, 2**64 - 1, "2**64 - 1 (torch's seed range)")
        if self.pad_token_id is not None:
            self.pad_token_id = _as_int("pad_token_id", self.pad_token_id, 0, None, "")
        if self.eos_token_id is not None:
            if isinstance(self.eos_token_id, (list, tuple)):  # [] = never stop at an EOS id
                self.eos_token_id = [_as_int("eos_token_id", e, 0, None, "") for e in self.eos_token_id]
            else:
                self.eos_token_id = _as_int("eos_token_id", self.eos_token_id, 0, None, "")
        self.stop = _as_stop_list(self.stop)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_any(cls, config: Any = None, **overrides: Any) -> GenerationSettings:
        """Build from ``None``, our settings, a dict, or a transformers ``GenerationConfig``; then apply overrides."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        if isinstance(config, GenerationSettings):
            values = config.to_dict()
        elif isinstance(config, dict):
            values = dict(config)
        elif config is not None and hasattr(config, "to_dict"):  # transformers.GenerationConfig
            raw = config.to_dict()
            values = {k: raw[k] for k in names if k in raw and raw[k] is not None}
            if raw.get("stop_strings"):
                values["stop"] = (
                    list(raw["stop_strings"]) if not isinstance(raw["stop_strings"], str) else [raw["stop_strings"]]
                )
            if values.get("top_k") is None:
                values.pop("top_k", None)
        elif config is not None:
            raise GenerationError(f"unsupported generation config type {type(config).__name__}")
        unknown = set(overrides) - names
        if unknown:
            raise GenerationError(f"unknown generation options: {sorted(unknown)}; valid: {sorted(names)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - names
        if unknown:
            raise GenerationError(f"unknown generation options: {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**values).validate()


def _check_ids(input_ids: Any, attention_mask: Any) -> None:
    """``input_ids`` must be a 2-D integer tensor [B, T] with T > 0, and ``attention_mask`` (if given) of its shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a 2-D integer tensor [batch, tokens]; got {shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape)
    ):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise InputError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {got}")


def check_context_length(prompt_tokens: int, image_tokens: int, max_new_tokens: int, config: Any) -> None:
    """Refuse, before any compute, a request whose positions would not fit the model's context window.

    ``prompt_tokens`` counts the text tokens (BOS included, the ``<image>`` placeholder not); the placeholder
    becomes ``image_tokens`` positions; generation adds up to ``max_new_tokens``. The window is
    ``config.context_window`` (``max_position_embeddings``, times the factor of linear or dynamic RoPE scaling).
    The verbalization is not counted: the compressor turns it into a fixed number of latents the mixers read, and
    it takes no positions. Raises :class:`~moai_sdk.InputError` stating every number.
    """
    total = prompt_tokens + image_tokens + max_new_tokens
    window = config.context_window
    if total > window:
        scaling = config.rope_scaling or {}
        how = (
            f"{float(scaling.get('factor', 1)):g} x max_position_embeddings {config.max_position_embeddings:,} with "
            f"{scaling.get('type', scaling.get('rope_type'))} RoPE scaling"
            if scaling
            else "max_position_embeddings"
        )
        raise InputError(
            f"the request needs {total:,} positions -- prompt {prompt_tokens:,} tokens + image {image_tokens:,} "
            f"+ max_new_tokens {max_new_tokens:,} -- but the model's context window is {window:,} ({how}); "
            "shorten the prompt or lower max_new_tokens"
        )


@dataclass
class GenerateOutput:
    """``sequences`` = prompt ids followed by the new ids (finished rows padded with ``pad_token_id``)."""

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    step_logits: list[torch.Tensor] | None = None
    sequence_scores: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: With ``output_gates=True``: the prefill's mixer gate weights (see ``MoAIForCausalLM.forward``).
    gate_weights: list | None = None
    #: With ``logprobs``: per row, one :class:`~moai_sdk.modeling.decoding.TokenLogprobs` per new token (rows
    #: that did not ask: ``None``).
    logprobs: list[list[TokenLogprobs] | None] | None = None


# ---------------------------------------------------------------------------------------------- main entry
@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    aux_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    im_mask: torch.Tensor | None = None,
    lang_mask: torch.Tensor | None = None,
    *,
    generation_config: Any = None,
    return_dict: bool = False,
    output_logits: bool = False,
    decode: Callable[[list[int]], str] | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    constraints: Sequence[TokenConstraint | None] | None = None,
    logprobs: int | Sequence[int | None] | None = None,
    num_choices: int = 1,
    **kwargs: Any,
):
    """Generate new tokens for a batch of MoAI prompts.

    Per-row options (greedy and sampling; decoded by :mod:`moai_sdk.modeling.decoding`): ``constraints`` one
    optional :class:`~moai_sdk.modeling.decoding.TokenConstraint` per output row (a row ends when its constraint
    terminates); ``logprobs`` ``K`` (0..20; or one per output row, ``None`` = off) records each new token's
    log-probability and the top ``K`` alternatives from the raw logits in ``GenerateOutput.logprobs``;
    ``num_choices`` = ``n``: each prompt is prefilled once and its cache copied into ``n`` consecutive output rows
    (rows ``i * n + j``); when sampling with a seed, choice ``j`` draws from its own generator seeded
    ``seed + j`` -- what a single call of that prompt with ``seed + j`` draws.

    Takes the forward's inputs (official keywords, or what :class:`~moai_sdk.MoAIProcessor` returns) plus
    generation options (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
    ``num_beams``, ``length_penalty``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``stop``,
    ``seed``) or a ``generation_config``. ``stop`` strings need ``decode`` (ids -> text).
    ``streamer(ids)`` is called with each step's new token ids [B] (greedy / sampling only).
    ``output_gates=True`` keeps the prefill's mixer gate weights in ``GenerateOutput.gate_weights``.

    Returns the prompt ids followed by the new ids, or a :class:`GenerateOutput` with ``return_dict=True``.
    """
    forward_keys = (
        "aux_attention_mask",
        "aux_input_ids",
        "panoptic_pixel_values",
        "image_features",
        "compressed_aux",
        "output_gates",
    )
    fwd_extra = {k: kwargs.pop(k) for k in forward_keys if k in kwargs}
    for k in ("mode", "use_cache", "image_token_index", "num_image_tokens"):
        kwargs.pop(k, None)
    settings = GenerationSettings.from_any(generation_config, **kwargs)
    if settings.stop and decode is None:
        raise GenerationError("stop strings need a decode function (pass decode=tokenizer.decode)")
    if pixel_values is None and fwd_extra.get("image_features") is None:
        raise GenerationError("generate needs pixel_values (or image_features): MoAI always sees an image")
    n_choices = _as_int("num_choices", num_choices, 1, MAX_NUM_BEAMS, "MAX_NUM_BEAMS")
    if (constraints is not None or logprobs is not None or n_choices > 1) and settings.num_beams > 1:
        raise GenerationError("constraints, logprobs and num_choices need greedy or sampling decoding (num_beams=1)")

    _check_ids(input_ids, attention_mask)
    device = model.device
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device).long()
    pad_id = settings.pad_token_id if settings.pad_token_id is not None else model.config.pad_token_id
    eos_ids = torch.tensor(_eos_list(settings, model.config.eos_token_id), device=device)
    vocab = model.config.vocab_size

    generator: Any = None
    if settings.do_sample:
        base_seed = settings.seed if settings.seed is not None else torch.seed()
        if n_choices == 1:
            generator = torch.Generator(device=device)
            generator.manual_seed(base_seed)
        else:  # one generator per output row: choice j of every prompt draws as a single call with seed + j
            generator = [
                torch.Generator(device=device).manual_seed((base_seed + j) % 2**64)
                for _ in range(b)
                for j in range(n_choices)
            ]
    rows_out = b * n_choices
    row_k = _row_logprobs_k(logprobs, rows_out)
    if constraints is not None and len(constraints) != rows_out:
        raise GenerationError(f"constraints must hold one entry per output row ({rows_out}); got {len(constraints)}")

    n_image = model.config.structure.num_patches
    capacity = t - 1 + n_image + settings.max_new_tokens
    check_context_length(t - 1, n_image, settings.max_new_tokens, model.config)
    bad_ids = [i for i in _eos_list(settings, 0) + [pad_id] if not 0 <= int(i) < vocab]
    if bad_ids:
        raise GenerationError(f"eos/pad token ids {bad_ids} lie outside the vocabulary (0..{vocab - 1})")
    cache = KVCache.allocate(model.config, b, capacity, model.dtype, device)
    t0 = time.perf_counter()
    out = model(
        input_ids,
        pixel_values,
        aux_embeds,
        attention_mask,
        im_mask,
        lang_mask,
        cache=cache,
        last_logits_only=True,
        **fwd_extra,
    )
    logits = out.logits[:, -1].float()
    mask = out.attention_mask
    synchronize(device)  # so that the timings split prefill and decode on asynchronous devices too
    timings = {"prefill": time.perf_counter() - t0}

    if settings.repetition_penalty != 1.0:
        seen = seen_from_prompt(input_ids, attention_mask, vocab)
    else:
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)

    t1 = time.perf_counter()
    if settings.cuda_graphs and settings.num_beams > 1:
        logger.info("cuda_graphs applies to greedy and sampling decoding; beam search decodes without graphs")
    if settings.num_beams > 1:
        result = _beam_search(model, settings, logits, mask, cache, seen, eos_ids, pad_id, b)
        new, scores, step_logits = result[0], result[1], None
    else:
        if n_choices > 1:  # one prefill per prompt, its cache copied into the prompt's n rows
            cache.repeat_interleave(n_choices)
            mask = mask.repeat_interleave(n_choices, dim=0)
            logits = logits.repeat_interleave(n_choices, dim=0)
            seen = seen.repeat_interleave(n_choices, dim=0)
            input_ids = input_ids.repeat_interleave(n_choices, dim=0)
        fixed = settings.cuda_graphs and FixedShapeDecoder.supported(model, cache.capacity)
        decoder = FixedShapeDecoder(model, cache, mask) if fixed else _GrowingMaskDecoder(model, cache, mask)
        rows_extra = _RowExtras(constraints, row_k)
        new, step_logits = _sample_or_greedy(
            decoder, settings, logits, seen, eos_ids, pad_id, generator, output_logits, decode, streamer, rows_extra
        )
        decoder.finish()
        scores = None
    synchronize(device)
    timings["decode"] = time.perf_counter() - t1

    width = max((len(r) for r in new), default=0)
    seq_new = torch.full((len(new), width), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(new):
        if row:
            seq_new[i, : len(row)] = torch.tensor(row, device=device)
    sequences = torch.cat((input_ids, seq_new), dim=1)
    if not return_dict:
        return sequences
    return GenerateOutput(
        sequences=sequences,
        new_tokens=new,
        step_logits=step_logits,
        sequence_scores=scores,
        timings=timings,
        gate_weights=out.gate_weights,
        logprobs=None if row_k is None or settings.num_beams > 1 else rows_extra.logprobs,
    )


def _row_logprobs_k(logprobs: Any, rows: int) -> list[int | None] | None:
    """``logprobs`` as one ``K`` (or None) per output row; None when no row asks."""
    if logprobs is None:
        return None
    values = list(logprobs) if isinstance(logprobs, (list, tuple)) else [logprobs] * rows
    if len(values) != rows:
        raise GenerationError(f"logprobs must be one K or one per output row ({rows}); got {len(values)}")
    out = [None if v is None else _as_int("logprobs", v, 0, MAX_LOGPROBS, "MAX_LOGPROBS") for v in values]
    return out if any(v is not None for v in out) else None


class _RowExtras:
    """The per-row constraint and log-probability bookkeeping of the greedy / sampling loop."""

    def __init__(self, constraints: Sequence[TokenConstraint | None] | None, k: list[int | None] | None):
        self.constraints = (
            list(constraints) if constraints is not None and any(c is not None for c in constraints) else None
        )
        self.k = k
        self.logprobs: list[list[TokenLogprobs] | None] | None = (
            None if k is None else [[] if v is not None else None for v in k]
        )

    def record(self, raw_logits: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """After a step: log-probabilities of the running rows, constraints advanced; returns the rows whose
        constraint terminated."""
        running = (~finished).tolist()
        if self.k is not None:
            k = [v if running[i] else None for i, v in enumerate(self.k)]
            for i, entry in enumerate(row_logprobs(raw_logits, tokens, k)):
                if entry is not None:
                    self.logprobs[i].append(entry)
        done = torch.zeros_like(finished)
        if self.constraints is not None:
            host = tokens.tolist()
            ended = [False] * len(host)
            for i, c in enumerate(self.constraints):
                if c is not None and running[i]:
                    c.accept(host[i])
                    ended[i] = c.is_terminated()
            done = torch.tensor(ended, dtype=torch.bool, device=finished.device)
        return done


class _AllFinishedFlag:
    """Whether every row has finished, read without stalling the device every step.

    Lagged (the default on CUDA): the flag is copied to pinned host memory without blocking and read only
    after the next decoding step has been queued, so the host waits for no more than the small sampling
    kernels of the step before and stays one step ahead of the GPU; when everything had finished, that queued
    step is simply dropped. Not lagged (elsewhere): the value is read at once. ``lagged=True`` on a CPU runs
    the lagged control flow with immediate reads (used by tests).
    """

    def __init__(self, device: torch.device, lagged: bool | None = None):
        self.cuda = device.type == "cuda"
        self.lagged = self.cuda if lagged is None else bool(lagged)
        self.value = False
        if self.lagged and self.cuda:
            self.host = torch.zeros((), dtype=torch.bool).pin_memory()
            self.event = torch.cuda.Event()

    def record(self, finished: torch.Tensor) -> None:
        if self.lagged and self.cuda:
            self.host.copy_(finished.all(), non_blocking=True)
            self.event.record()
        else:
            self.value = bool(finished.all())

    def done_before_next_step(self) -> bool:
        """True when every row is known to be finished before queuing another step (not lagged)."""
        return not self.lagged and self.value

    def done_after_next_step_queued(self) -> bool:
        """True when every row had finished before the step just queued (lagged)."""
        if not self.lagged:
            return False
        if self.cuda:
            self.event.synchronize()
            return bool(self.host)
        return self.value


class _GrowingMaskDecoder:
    """One decoding step as a plain forward: the mask grows by one column, the cache by one slot."""

    def __init__(self, model, cache: KVCache, mask: torch.Tensor):
        self.model, self.cache, self.mask = model, cache, mask
        self.ones = torch.ones_like(mask[:, :1])

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat((self.mask, self.ones), dim=1)
        out = self.model(tokens[:, None], attention_mask=self.mask, cache=self.cache, last_logits_only=True)
        return out.logits[:, -1].float()

    def finish(self) -> None:
        pass


class FixedShapeDecoder:
    """Decoding steps whose shapes never change, replayed as one CUDA graph per generation on CUDA.

    The key mask spans the whole cache (slots not written yet are masked), the slot to write and the mask
    update live on the device, and the step reads nothing back to the host -- so every step is the same
    sequence of kernels. On CUDA the first step runs normally on a side stream (it also warms up the kernels),
    the second is captured into a graph on that stream and each later step is a single replay; elsewhere, and
    if capturing fails (logged), the same fixed-shape steps run without a graph. The logits equal those of
    the growing-mask steps up to float rounding (the attention also sums the masked slots' zero weights).
    """

    def __init__(self, model, cache: KVCache, mask: torch.Tensor):
        b, used = mask.shape
        capacity = cache.capacity
        if used >= capacity:
            raise GenerationError(f"the cache has no room for new tokens (capacity {capacity}, used {used})")
        self.model, self.cache = model, cache
        # The attention reads every slot: unwritten ones must hold finite values (the cache is allocated
        # uninitialised, and a masked NaN would still poison the weighted sum).
        for layer in cache.layers:
            layer.key[:, :, used:].zero_()
            layer.value[:, :, used:].zero_()
        device = mask.device
        self.mask = torch.zeros(b, capacity, dtype=mask.dtype, device=device)
        self.mask[:, :used] = mask
        self.index = torch.tensor([used], dtype=torch.long, device=device)
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.steps = 0
        self.use_graph = device.type == "cuda"
        self.stream: Any = None
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    @staticmethod
    def supported(model, capacity: int) -> bool:
        """False (logged) when the model's rotary embedding depends on the running length: dynamic NTK scaling
        beyond ``max_position_embeddings`` cannot be part of a fixed-shape step."""
        layers = model.model.layers
        rotary = layers[0].attention.rotary if len(layers) else None
        if rotary is not None and rotary.varies_with_length(capacity):
            logger.info(
                "cuda_graphs: %d positions exceed max_position_embeddings (%d) under dynamic RoPE scaling; "
                "decoding without fixed-shape steps",
                capacity,
                rotary.max_position_embeddings,
            )
            return False
        return True

    def _step(self) -> torch.Tensor:
        self.mask.index_fill_(1, self.index, 1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        embeds = self.model.get_input_embeddings()(self.tokens)
        hidden = self.model.model(
            embeds, attention_mask=self.mask, positions=positions, cache=self.cache, cache_index=self.index
        )
        logits = self.model.output(hidden).float()[:, -1]
        self.index.add_(1)
        return logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps + self.cache.length >= self.cache.capacity:
            raise GenerationError("decoding ran past the cache capacity")
        self.tokens.copy_(tokens[:, None])
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.use_graph:
            return self._step()
        if self.steps == 1:
            return self._warm_up()
        return self._capture_and_run()

    def _warm_up(self) -> torch.Tensor:
        """The first step, run on the stream the graph will be captured on (lazy kernel and library set-up
        happens here, not during the capture)."""
        current = torch.cuda.current_stream(self.mask.device)
        self.stream = torch.cuda.Stream(self.mask.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            logits = self._step()
        current.wait_stream(self.stream)
        return logits.clone()

    def _capture_and_run(self) -> torch.Tensor:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: CUDA calls that other threads make meanwhile (a server, a streaming consumer) are
            # not this capture's business
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                logits = self._step()  # recorded, not run
        except RuntimeError as exc:
            logger.warning("CUDA graph capture failed (%s); decoding without a graph", exc)
            self.use_graph = False
            return self._step()
        self.graph, self.logits = graph, logits
        graph.replay()
        return logits

    def finish(self) -> None:
        """Account the decoded slots in the cache and release the graph."""
        self.cache.length += self.steps
        self.graph = None


def _sample_or_greedy(
    decoder, s, logits, seen, eos_ids, pad_id, generator, output_logits, decode, streamer, extras=None
):
    """Greedy / sampling loop. Tokens stay on the device; the host reads them once at the end (stop strings
    excepted: they need the text of every step)."""
    b = logits.shape[0]
    device = logits.device
    steps_max = s.max_new_tokens
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    tokens = torch.full((b, steps_max), pad_id, dtype=torch.long, device=device)
    finish_step = torch.full((b,), steps_max, dtype=torch.long, device=device)
    rows_idx = torch.arange(b, device=device)
    pad = torch.full((b,), pad_id, dtype=torch.long, device=device)
    flag = _AllFinishedFlag(device)
    params = SamplingParams.shared(s)  # the decoding core (moai_sdk.modeling.decoding), one setting for all rows
    step_logits: list[torch.Tensor] | None = [] if output_logits else None
    steps = 0
    for step in range(steps_max):
        if step_logits is not None:
            step_logits.append(logits.clone())
        constraints = extras.constraints if extras is not None else None
        nxt = next_tokens(logits, params, seen=seen, generator=generator, constraints=constraints)
        nxt = torch.where(finished, pad, nxt)
        ended = extras.record(logits, nxt, finished) if extras is not None else None
        tokens[:, step] = nxt
        steps = step + 1
        if streamer is not None:
            streamer(nxt)
        if s.repetition_penalty != 1.0:
            seen[rows_idx, nxt] |= ~finished
        done_now = torch.isin(nxt, eos_ids) & ~finished
        if ended is not None:
            done_now = done_now | (ended & ~finished)
        if s.stop:
            done_now = _apply_stop_strings(decode, s.stop, tokens[:, :steps], done_now, finished)
        finish_step = torch.where(done_now, step, finish_step)
        finished = finished | done_now
        if step == steps_max - 1:
            break
        flag.record(finished)
        if flag.done_before_next_step():
            break
        logits = decoder(nxt)
        if flag.done_after_next_step_queued():
            break  # the step just queued only fed finished rows; its logits are dropped
    host_tokens = tokens[:, :steps].tolist()
    lengths = (finish_step + 1).clamp_max(steps).tolist()
    rows = [host_tokens[i][: lengths[i]] for i in range(b)]
    return rows, step_logits


def _apply_stop_strings(decode, stops, tokens, done_now, finished) -> torch.Tensor:
    """Mark rows whose text (up to this step) contains a stop string; host-side, every step."""
    host = tokens.tolist()
    running = (~finished & ~done_now).tolist()
    hit = [running[i] and hit_stop_string(decode, host[i], stops) for i in range(len(host))]
    if not any(hit):
        return done_now
    return done_now | torch.tensor(hit, dtype=torch.bool, device=done_now.device)


class _Hypotheses:
    """Finished beam hypotheses of one sample (the best ``num_beams`` by length-normalised score)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.items: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (max(len(tokens), 1) ** self.length_penalty)
        self.items.append((score, tokens))
        self.items.sort(key=lambda x: x[0], reverse=True)
        del self.items[self.num_beams :]

    def worst(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.num_beams else float("-inf")

    def is_done(self, best_running: float, cur_len: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        return self.worst() >= best_running / (max(cur_len, 1) ** self.length_penalty)


def _beam_search(model, s, logits, mask, cache, seen, eos_ids, pad_id, b):
    nb = s.num_beams
    device = logits.device
    vocab = logits.shape[-1]
    cache.repeat_interleave(nb)
    mask = mask.repeat_interleave(nb, dim=0)
    seen = seen.repeat_interleave(nb, dim=0)
    logits = logits.repeat_interleave(nb, dim=0)
    beam_scores = torch.zeros(b, nb, device=device)
    beam_scores[:, 1:] = -1e9  # all beams start identical: only the first one expands at step 1
    beam_scores = beam_scores.view(-1)
    tokens: list[list[int]] = [[] for _ in range(b * nb)]
    hyps = [_Hypotheses(nb, s.length_penalty) for _ in range(b)]
    done = [False] * b
    eos_set = set(eos_ids.tolist())
    for step in range(s.max_new_tokens):
        scores = apply_repetition_penalty(logits, seen, s.repetition_penalty)
        logp = F.log_softmax(scores, dim=-1) + beam_scores[:, None]
        top_scores, top_idx = torch.topk(logp.view(b, nb * vocab), 2 * nb, dim=1)
        beam_src = (top_idx // vocab).tolist()
        tok = (top_idx % vocab).tolist()
        top_scores_h = top_scores.tolist()
        next_scores = torch.zeros(b, nb, device=device)
        next_tokens = torch.full((b, nb), pad_id, dtype=torch.long, device=device)
        next_src = torch.zeros(b, nb, dtype=torch.long, device=device)
        cur_len = step + 1
        for i in range(b):
            if done[i]:
                next_src[i] = torch.arange(nb, device=device) + i * nb
                continue
            k = 0
            for rank in range(2 * nb):
                src = i * nb + beam_src[i][rank]
                t = tok[i][rank]
                if t in eos_set:
                    if rank >= nb:
                        continue
                    hyps[i].add(tokens[src] + [t], top_scores_h[i][rank])
                else:
                    next_scores[i, k] = top_scores_h[i][rank]
                    next_tokens[i, k] = t
                    next_src[i, k] = src
                    k += 1
                if k == nb:
                    break
            done[i] = hyps[i].is_done(float(next_scores[i].max()), cur_len)
        if all(done) or step == s.max_new_tokens - 1:
            # finalize: running beams become hypotheses
            for i in range(b):
                if done[i]:
                    continue
                for j in range(nb):
                    src = int(next_src[i, j])
                    hyps[i].add(tokens[src] + [int(next_tokens[i, j])], float(next_scores[i, j]))
            break
        src_flat = next_src.view(-1)
        tokens = [tokens[int(src)] + [int(t)] for src, t in zip(src_flat.tolist(), next_tokens.view(-1).tolist())]
        beam_scores = next_scores.view(-1)
        cache.reorder(src_flat)
        seen = seen.index_select(0, src_flat)
        seen[torch.arange(b * nb, device=device), next_tokens.view(-1)] = True
        mask = torch.cat((mask.index_select(0, src_flat), torch.ones_like(mask[:, :1])), dim=1)
        logits = (
            model(next_tokens.view(-1, 1), attention_mask=mask, cache=cache, last_logits_only=True)
            .logits[:, -1]
            .float()
        )
    best = [h.items[0][1] if h.items else [] for h in hyps]
    best_scores = torch.tensor([h.items[0][0] if h.items else float("-inf") for h in hyps])
    return best, best_scores


__all__ = ["GenerationSettings", "GenerateOutput", "generate", "apply_repetition_penalty", "warp_for_sampling"]
