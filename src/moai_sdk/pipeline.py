"""`MoAIPipeline`: image + question -> answer, a thin facade over one module per stage.

=============  ====================================================================  =======================
stage          module / class                                                        from the pipeline
=============  ====================================================================  =======================
experts        ``experts.selection.resolve_experts`` -> one ``Expert`` per task,     ``pipe.experts[task]``
               run by ``experts.base.Perception`` through the ``cache.ExpertCache``
verbalization  ``verbalization.verbalize``: experts' results -> aux text             ``pipe.verbalize``
processor      ``processing.MoAIProcessor``: prompts, aux texts, images -> tensors   ``pipe.processor``
vision         ``modeling.vision.CLIPVisionTower`` + ``VisionProjector``             ``pipe.vision_tower``
compressor     ``modeling.compressor.MoAICompressor``: aux text + map -> tokens      ``pipe.compressor``
mixer          ``modeling.mixer.MoAIMixer``, in the mixer layers of the decoder      ``pipe.mixers``
decoding       ``modeling.generation.generate`` (prefill, decode); answers cut       ``pipe.model.generate``
               and streamed by ``streaming`` (``cut_answer``, ``AnswerStream``)
=============  ====================================================================  =======================

Modules are under ``moai_sdk``.

The pipeline records its configuration when it is built and loads each component the first time it is needed
(or all at once with :meth:`MoAIPipeline.load`). Hub settings (revision, cache folder, token, offline) are one
:class:`~moai_sdk.hub.HubOptions`, ``pipe.hub``, used by the model, the processor and (without the model's
revision) the experts.

A call follows the official demo: the image is resized to 490 x 490 (:func:`~moai_sdk.imageops.official_resize`),
the experts run on that frame, their results are verbalized and painted into the panoptic colour map, the
processor builds the model inputs with the chosen template ("chat" by default), and the answer is the decoded new
tokens (special tokens skipped) cut at the first ``"[U"`` -- as the official demo cuts at the InternLM2 chat
markers -- and at the first stop string.

Each stage is timed; :class:`~moai_sdk.results.MoAIResult.timings` holds ``expert.<name>``, ``verbalization``,
``preprocess``, ``vision``, ``compression``, ``prefill``, ``decode`` and ``total`` (seconds, for the whole call:
the results of one batch share them). ``expert.<name>`` includes loading that expert the first time it runs
(and is ~0 when its output came from the cache); the call that loads the language model also reports ``load``,
which ``total`` leaves out. On CUDA each stage ends with a device synchronisation.

``MoAIResult.token_counts``: ``prompt`` (text tokens of the full prompt, BOS included, the ``<image>``
placeholder not), ``image`` (image positions, 1225 for MoAI-7B), ``context`` (their sum: the sequence the
language model prefills), ``aux`` (tokens of the verbalization, BOS included; the compressor also reads the
panoptic map's image tokens) and ``generated`` (new tokens, EOS included when it was produced).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from . import explain
from .cache import ExpertCache
from .defaults import DEFAULT_MODEL_ID
from .devices import resolve_device, resolve_dtype, synchronize
from .errors import ConfigError, GenerationError, InputError
from .experts.base import Expert, Perception, check_on_expert_error
from .experts.selection import DEFAULT_EXPERTS, ExpertSpec, resolve_cache, resolve_experts, select_experts
from .hub import HubOptions, HubSettings
from .imageops import MOAI_IMAGE_SIZE, per_row, prepare_frames, split_images
from .modeling import GenerationSettings, MoAIForCausalLM
from .modeling.compressor import MoAICompressor
from .modeling.config import check_attn_implementation
from .modeling.decoding import TokenLogprobs, eos_ids, finish_reason
from .modeling.generation import GenerateOutput
from .modeling.mixer import GateWeights, MoAIMixer
from .modeling.quantization import check_quantization
from .modeling.scoring import score_continuations
from .processing import MoAIInputs, MoAIProcessor
from .prompts import DEFAULT_TEMPLATE, check_template
from .results import ContinuationScore, MoAIResult, PerceptionResult, ScoreResult, TokenLogprob, TopLogprob
from .streaming import ANSWER_CUT, AnswerStream, TokenCallback, cut_answer, stream_in_thread
from .structured import StructuredOutputs
from .tokenization import MoAITokenizer
from .verbalization import EMPTY_VERBALIZATION, verbalize

logger = logging.getLogger(__name__)

#: Generation settings of the official demo (sampling) and of the official benchmark scripts (beam search).
OFFICIAL_DEMO_GENERATION: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 256}
OFFICIAL_BENCHMARK_GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 3, "max_new_tokens": 128}

#: The keywords of a call besides the generation options (which are the fields of ``GenerationSettings``).
_CALL_OPTION_NAMES = (
    "template",
    "perception",
    "experts",
    "return_gates",
    "allow_special_tokens",
    "allow_remote",
    "response_format",
    "logprobs",
    "n",
)

#: Most choices one call may ask for (``n``).
MAX_CHOICES = 16


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _is_batch(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4


def _broadcast(images: list[Any], prompts: list[Any]) -> tuple[list[Any], list[str]]:
    """One image per prompt: equal lengths, or one of either shared by all of the other."""
    if not images:
        raise InputError("no images given; MoAI answers about exactly one image per prompt")
    if not prompts:
        raise InputError("no prompts given; pass one prompt per image (or one prompt for all images)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"prompt {i} must be a str; got {type(p).__name__}")
    if len(images) == len(prompts):
        return images, prompts
    if len(prompts) == 1:
        return images, prompts * len(images)
    if len(images) == 1:
        return images * len(prompts), prompts
    raise InputError(
        f"got {len(images)} images and {len(prompts)} prompts; pass one prompt per image, one prompt for all "
        "images, or one image for all prompts"
    )


def _given_perceptions(perception: Any, n: int) -> list[PerceptionResult]:
    """Precomputed perceptions of a call: one, or one per image."""
    return per_row(split_images(perception), n, "precomputed perceptions", PerceptionResult, name="perception")


class _Prepared(NamedTuple):
    """What the stages before the language model produce, one entry per row."""

    prompts: list[str]
    perceptions: list[Optional[PerceptionResult]]
    aux_texts: list[str]
    inputs: MoAIInputs


def _token_counts(inputs: MoAIInputs, row: int, generated: int) -> dict[str, int]:
    prompt = int(inputs.attention_mask[row].sum()) - 1  # the <image> placeholder is not text
    image = int(inputs.num_image_tokens)
    aux = int(inputs.aux_attention_mask[row].sum())
    return {"prompt": prompt, "image": image, "aux": aux, "generated": generated, "context": prompt + image}


def _results(
    rows: _Prepared,
    out: GenerateOutput,
    texts: list[str],
    timings: dict[str, float],
    gate_weights: list[GateWeights],
    return_gates: Union[bool, str],
    settings: GenerationSettings,
    model_id: str,
    revision: Optional[str],
    n: int = 1,
) -> list[MoAIResult]:
    """One :class:`MoAIResult` per row, with the recorded ``gate_weights`` as ``mixer`` when ``return_gates``;
    the model id, revision, seed and generation settings are the same for all."""
    gates = explain.batch_gates(gate_weights, rows.inputs, return_gates)
    shared = dict(model_id=model_id, revision=revision, generation=settings.to_dict())
    results = []
    for r, new in enumerate(out.new_tokens):
        i, j = divmod(r, n)  # output row r: choice j of prompt i
        seed = (
            settings.seed if settings.seed is None or n == 1 or not settings.do_sample else (settings.seed + j) % 2**64
        )
        results.append(
            MoAIResult(
                text=texts[r],
                prompt=rows.prompts[i],
                perception=rows.perceptions[i],
                aux_text=rows.aux_texts[i],
                token_counts=_token_counts(rows.inputs, i, len(new)),
                timings=dict(timings),
                new_token_ids=[int(t) for t in new],
                mixer=gates[i],
                seed=seed,
                index=j,
                **shared,
            )
        )
    return results


def _continuation_lists(continuations: Any, batch: bool) -> list[list[str]]:
    """``continuations`` as one list of strings per row: a list of strings (one prompt, or shared by every
    prompt of a batch) or, for a batch, one list per prompt."""

    def strings(value: Any, where: str) -> list[str]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise InputError(f"{where} must be a list of strings; got {type(value).__name__}")
        for j, c in enumerate(value):
            if not isinstance(c, str):
                raise InputError(f"{where}[{j}] must be a str; got {type(c).__name__}")
        return list(value)

    if batch and isinstance(continuations, (list, tuple)) and continuations and not isinstance(continuations[0], str):
        return [strings(c, f"continuations[{i}]") for i, c in enumerate(continuations)]
    return [strings(continuations, "continuations")]


def _cut_at_stops(text: str, stop: Sequence[str]) -> str:
    """A structured answer up to the first stop string (it has no chat-marker cut: the grammar wrote it)."""
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


def _choices(n: Any) -> int:
    """``n`` (choices per prompt) as an int in 1..MAX_CHOICES."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= MAX_CHOICES:
        raise GenerationError(f"n must be an integer between 1 and {MAX_CHOICES}; got {n!r}")
    return int(n)


def _quantization_on(device: torch.device, quantization: Optional[str]) -> Optional[str]:
    """The quantization a pipeline on ``device`` uses: bitsandbytes' 4/8-bit kernels and torchao's int4 kernel are
    for CUDA."""
    if quantization is None or device.type == "cuda":
        return quantization
    if quantization == "int4":
        logger.warning(
            "quantization='int4' needs a CUDA GPU (torchao's tinygemm kernel); loading the model unquantized on %s",
            device,
        )
        return None
    logger.warning(
        "quantization=%r is for CUDA GPUs (bitsandbytes' CPU 4/8-bit kernels are slow); loading the model "
        "unquantized on %s. To force it, load MoAIForCausalLM.from_pretrained(..., quantization=%r)",
        *(quantization, device, quantization),
    )
    return None


def _settings(
    default: GenerationSettings, base: Any, options: dict[str, Any], on_token: Optional[TokenCallback] = None
) -> GenerationSettings:
    """``base`` (settings, dict or transformers config; None: the pipeline's ``default``) with a call's generation
    ``options``; when sampling without a seed one is drawn here, so that the result records it and the answer can
    be reproduced."""
    settings = GenerationSettings.from_any(default if base is None else base, **options)
    if on_token is not None and settings.num_beams > 1:
        raise GenerationError("on_token needs greedy or sampling decoding; beam search (num_beams > 1) has none")
    if settings.do_sample and settings.seed is None:
        settings.seed = random.SystemRandom().randrange(2**31)
    return settings


def _stream_settings(default: GenerationSettings, options: dict[str, Any]) -> GenerationSettings:
    """The generation settings of a ``stream`` call, popped from its ``options`` (what is left are the call
    options of :meth:`MoAIPipeline.__call__`); beam search cannot stream."""
    base = options.pop("generation_config", None)
    generation = {k: options.pop(k) for k in list(options) if k not in _CALL_OPTION_NAMES}
    settings = _settings(default, base, generation)
    if settings.num_beams > 1:
        raise GenerationError("beam search (num_beams > 1) cannot stream; use num_beams=1 or call the pipeline")
    return settings


def _describe(experts: dict[str, Expert]) -> str:
    """``{task: name 'model id' (loaded), ...}`` for the pipeline's repr."""
    parts = [
        f"{task}: {e.name}{f' {e.model_id!r}' if e.model_id else ''}{' (loaded)' if e.is_loaded else ''}"
        for task, e in experts.items()
    ]
    return "{" + ", ".join(parts) + "}" if parts else "none"


class _Timer:
    """Collects stage durations (seconds), synchronising the device so that queued work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------


class MoAIPipeline(HubSettings):
    """Image + question -> :class:`~moai_sdk.results.MoAIResult`, with MoAI and its perception experts.

    Build it with :meth:`from_pretrained` (or the constructor); nothing is downloaded or loaded until first use (or
    :meth:`load`). One image and one prompt give one result; lists give a list, run as one left-padded batch.

    Args:
        model: Hub id (default ``"BK-Lee/MoAI-7B"``) or a local checkpoint folder (official layout).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda[:N]"``, for the experts too; ``dtype``:
            ``"auto"`` = float16 on CUDA, float32 on CPU.
        quantization: ``"nf4"`` (default; the LLM's main weights in 4 bit), ``"nf4-lora"`` (also PLoRA), ``"int8"``,
            ``"int4"`` (torchao), ``"official"`` or ``None``; without CUDA the model loads unquantized (logged).
        experts: ``"default"`` (Mask2Former, OWLv2, PSGTR, RapidOCR), a list of names or tasks, a dict by task with
            model ids / backends / thresholds, or ``None`` (see :func:`~moai_sdk.experts.selection.resolve_experts`).
        hub: :class:`~moai_sdk.hub.HubOptions` (or a dict); ``revision``, ``cache_dir``, ``local_files_only`` and
            ``token`` set its fields (and win). All but the revision apply to the experts too.
        template: ``"chat"`` (default) or ``"demo"``; ``cache``: True / False / a size / an ``ExpertCache``.
        on_expert_error: ``"raise"`` or ``"warn"`` (a failing expert leaves its part empty, with a warning).
        generation_config: every call's generation defaults; ``attn_implementation``: ``"sdpa"`` or ``"eager"``.
        corrected_verbalization: fix the official verbalization's slips; ``keep_image``: keep the frame (to plot).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        quantization: Optional[str] = "nf4",
        experts: Any = "default",
        hub: Optional[HubOptions] = None,
        revision: Optional[str] = None,
        cache_dir: Optional[str | os.PathLike] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        template: str = DEFAULT_TEMPLATE,
        cache: Union[bool, int, ExpertCache] = True,
        on_expert_error: str = "raise",
        generation_config: Any = None,
        attn_implementation: str = "sdpa",
        corrected_verbalization: bool = False,
        keep_image: bool = True,
    ) -> None:
        if not isinstance(model, (str, os.PathLike)) or not str(model):
            raise ConfigError(f"model must be a Hub id or a local checkpoint folder; got {model!r}")
        self.model_id = str(model)
        legacy = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None)
        self.hub = HubOptions.from_any(hub, **legacy)  # the keywords win over ``hub``
        self.device = resolve_device(device)
        self.dtype = dtype
        self.quantization = _quantization_on(self.device, check_quantization(quantization))
        self.attn_implementation = check_attn_implementation(attn_implementation)
        self.template = check_template(template)
        self.on_expert_error = check_on_expert_error(on_expert_error)
        self.corrected_verbalization = bool(corrected_verbalization)
        self.keep_image = bool(keep_image)
        self.generation_config = GenerationSettings.from_any(generation_config)
        self.cache = resolve_cache(cache)
        expert_hub = self.hub.replace(revision=None)  # the cache folder, token and offline flag; not the revision
        self.experts: dict[str, Expert] = resolve_experts(experts, hub=expert_hub, device=self.device)
        self._runners: dict[tuple[str, ...], Perception] = {}  # one Perception runner per expert selection
        self._model: Optional[MoAIForCausalLM] = None
        self._processor: Optional[MoAIProcessor] = None
        self._lock = threading.RLock()
        self._structured: Optional[StructuredOutputs] = None
        if self.experts:
            self._runner(list(self.experts.values()))  # built now: it says at once what the experts leave out

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike = DEFAULT_MODEL_ID, *, load: bool = False, **options: Any
    ) -> MoAIPipeline:
        """A pipeline on ``model`` with the options of :class:`MoAIPipeline` (its Args); nothing is downloaded or
        loaded until first use, unless ``load=True``."""
        pipe = cls(model, **options)
        return pipe.load() if load else pipe

    @property
    def model(self) -> MoAIForCausalLM:
        """The MoAI model (loaded on first access)."""
        with self._lock:
            if self._model is None:
                t0 = time.perf_counter()
                options = dict(dtype=self.dtype, device=self.device, quantization=self.quantization, hub=self.hub)
                options.update(attn_implementation=self.attn_implementation)
                self._model = MoAIForCausalLM.from_pretrained(self.model_id, **options)
                logger.info("loaded %s in %.1fs", self.model_id, time.perf_counter() - t0)
            return self._model

    @property
    def processor(self) -> MoAIProcessor:
        """The processor (tokenizer + image settings of the checkpoint; loaded on first access)."""
        with self._lock:
            if self._processor is None:
                dtype = self._model.dtype if self._model is not None else resolve_dtype(self.dtype, self.device)
                self._processor = MoAIProcessor.from_pretrained(self.model_id, hub=self.hub, normalize_dtype=dtype)
            return self._processor

    @property
    def tokenizer(self) -> MoAITokenizer:
        return self.processor.tokenizer

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The CLIP vision tower inside the model (loads the model)."""
        return self.model.vit

    @property
    def compressor(self) -> MoAICompressor:
        """The compressor inside the model: verbalization + panoptic map -> the aux tokens the mixers read."""
        return self.model.compressor

    @property
    def mixers(self) -> list[MoAIMixer]:
        """The MoAI mixers of the decoder layers that have one (loads the model)."""
        return self.model.mixers

    @property
    def loaded(self) -> dict[str, bool]:
        """Which components are in memory: ``model``, ``processor`` and ``expert.<name>``."""
        out = {"model": self._model is not None, "processor": self._processor is not None}
        out.update({f"expert.{e.name}": e.is_loaded for e in self.experts.values()})
        return out

    def load(self) -> MoAIPipeline:
        """Load the model, the processor and every expert now; returns ``self``."""
        _ = self.model, self.processor
        for exp in self.experts.values():
            exp.load()  # on the device it was configured with (the pipeline's unless given otherwise)
        return self

    def unload(self) -> None:
        """Free the model and the experts (they load again on the next call); the expert cache is kept."""
        with self._lock:
            self._model = None
            for exp in self.experts.values():
                exp.unload()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def to(self, device: str | torch.device) -> MoAIPipeline:
        """Move the pipeline (the model if loaded, every expert) to ``device``; returns ``self``."""
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are the same card
        with self._lock:
            if self._model is not None and dev != self._model.device:
                if self._model.load_info.get("quantization"):
                    raise ConfigError(f"a quantized model cannot move; build the pipeline with device={str(dev)!r}")
                self._model.to(dev)
            for exp in self.experts.values():
                exp.to(dev)
            self.device = dev
        return self

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        return (
            f"MoAIPipeline(model={self.model_id!r}, revision={self.revision!r} [{state}], device={str(self.device)!r}, "
            f"dtype={str(self.dtype).replace('torch.', '')!r}, quantization={self.quantization!r}, "
            f"template={self.template!r}, experts={_describe(self.experts)}, cache={self.cache!r})"
        )

    def _runner(self, experts: list[Expert]) -> Perception:
        """The Perception runner of one expert selection (built once; it shares the pipeline's cache)."""
        key = tuple(e.name for e in experts)
        if key not in self._runners:
            self._runners[key] = Perception(
                experts, on_expert_error=self.on_expert_error, keep_image=self.keep_image, cache=self.cache
            )
        return self._runners[key]

    def _frames(self, images: Any, allow_remote: bool = False) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Official resize of every image: uint8 [3, S, S] frames, original (width, height); URLs: ``allow_remote``."""
        size = self._processor.image_size if self._processor is not None else MOAI_IMAGE_SIZE
        if self._processor is None and self._model is not None:
            size = int(self._model.config.structure.image_size)
        return prepare_frames(split_images(images), size, allow_remote=allow_remote)

    def perceive(
        self, images: Any, *, experts: Any = None, allow_remote: bool = False
    ) -> Union[PerceptionResult, list[PerceptionResult]]:
        """Run the experts only (no language model): one :class:`PerceptionResult` per image (PIL, path, bytes,
        numpy HWC / torch CHW uint8, a URL with ``allow_remote``); ``experts``: a subset (names or tasks)."""
        chosen = select_experts(self.experts, experts)
        if not chosen:
            raise ConfigError("this pipeline has no experts to run; configure them with from_pretrained(experts=...)")
        frames, sizes = self._frames(images, allow_remote)
        if not frames:
            raise InputError("no images given")
        results = self._runner(chosen).run_frames(frames, sizes)
        return results if _is_batch(images) else results[0]

    def verbalize(self, perception: Optional[PerceptionResult]) -> str:
        """The auxiliary text MoAI reads for ``perception`` (official :func:`~moai_sdk.verbalization.verbalize`;
        ``None`` gives the official empty verbalization of three spaces)."""
        if perception is None:
            return EMPTY_VERBALIZATION
        if not isinstance(perception, PerceptionResult):
            raise InputError(f"verbalize needs a PerceptionResult; got {type(perception).__name__}")
        return verbalize(perception, corrected=self.corrected_verbalization)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, keep_chat_markers=True)

    def answer_text(self, token_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
        """The answer for generated ``token_ids``: decoded with special tokens skipped (chat markers printed,
        as the official tokenizer does), cut at the first ``"[U"`` like the official demo and at the first stop
        string (:func:`~moai_sdk.streaming.cut_answer`)."""
        return cut_answer(self._decode(token_ids), stop)

    def __call__(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        *,
        generation_config: Any = None,
        template: Optional[Union[str, Sequence[str]]] = None,
        perception: Any = None,
        experts: Any = None,
        on_token: Optional[TokenCallback] = None,
        return_gates: Union[bool, str] = False,
        allow_special_tokens: bool = False,
        allow_remote: bool = False,
        response_format: Any = None,
        logprobs: Optional[int] = None,
        n: int = 1,
        **generation: Any,
    ) -> Union[MoAIResult, list[MoAIResult]]:
        """Answer ``prompts`` about ``images``: one image and one prompt give a :class:`MoAIResult`; lists (one
        each, or one shared) give a list, computed as one left-padded batch.

        * generation: the fields of :class:`~moai_sdk.modeling.GenerationSettings` (``max_new_tokens``,
          ``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ``stop`` strings, ``seed`` -- drawn and recorded
          when sampling without one --, ...) over ``generation_config`` (settings, dict or transformers config);
        * ``template``: ``"chat"`` / ``"demo"`` (or one per row); ``experts``: a subset of the configured experts
          (names or tasks), ``[]`` for none; ``perception``: precomputed results (one, or one per image) instead;
        * ``on_token(ids)``: called after each step with every row's new token id (a [B] tensor; greedy and
          sampling); an exception raised in it stops the generation and propagates;
        * ``return_gates``: ``True`` / ``"tokens"`` (per token too) fills ``result.mixer`` with the gate weights;
        * ``allow_special_tokens``: control strings in a prompt (``</s>``, ...) become control tokens (default:
          plain text); ``allow_remote``: fetch ``http(s)://`` image URLs (timeout, byte cap; default off).

        * ``response_format``: constrain the answer (see :mod:`moai_sdk.structured`): a Pydantic model class, a
          JSON-schema dict, ``{"type": "json_object"}``, ``{"choice": [...]}``, ``{"regex": ...}`` or
          ``{"grammar": ...}``; ``result.parsed`` is then the validated instance / the parsed JSON / the text;
        * ``logprobs=K`` (0..20): ``result.logprobs`` holds, per generated token, its log-probability under the raw
          next-token distribution (before repetition penalty, constraint and temperature) and the top ``K``;
        * ``n``: that many choices per prompt from one perception and one prefill; a single image and prompt
          then give a list of ``n`` results (a batch: ``n`` consecutive results per prompt). Choice ``i`` has
          ``result.index == i`` and, when sampling, ``result.seed == seed + i``: calling with that seed alone
          reproduces it.

        Prompt + image tokens + ``max_new_tokens`` must fit the context window: checked before any compute.
        """
        settings = _settings(self.generation_config, generation_config, generation, on_token)
        n = _choices(n)
        if (response_format is not None or logprobs is not None or n > 1) and settings.num_beams > 1:
            raise GenerationError("response_format, logprobs and n need greedy or sampling decoding (num_beams=1)")
        timer = _Timer(self.device)
        if self._model is None or self._processor is None:
            with timer.stage("load"):  # one-off, kept out of "total"
                _ = self.processor, self.model
        t0 = time.perf_counter()
        raw, limit = bool(allow_special_tokens), settings.max_new_tokens
        fmt = self.structured.compile(response_format) if response_format is not None else None  # errors first
        rows = self._prepare(images, prompts, template, perception, experts, timer, allow_remote, raw, limit)
        constraints = None
        if fmt is not None:
            constraints = [self.structured.constraint(fmt) for _ in range(len(rows.prompts) * n)]
        extra = dict(constraints=constraints, logprobs=logprobs, num_choices=n)
        with explain.recording_gates(self.model, return_gates) as gate_weights:
            out = self._generate(rows.inputs, settings, timer, on_token, **extra)
        timer.timings["total"] = time.perf_counter() - t0
        texts = [
            _cut_at_stops(constraints[r].text, settings.stop) if constraints else self.answer_text(new, settings.stop)
            for r, new in enumerate(out.new_tokens)
        ]
        shared = (settings, self.model_id, self.model.load_info.get("revision") or self.revision)
        results = _results(rows, out, texts, timer.timings, gate_weights, return_gates, *shared, n=n)
        self._add_outputs(results, out, settings, constraints)
        return results if _is_batch(images) or _is_batch(prompts) or n > 1 else results[0]

    @property
    def structured(self) -> StructuredOutputs:
        """The compiler of ``response_format`` for this model's vocabulary, with its cache of compiled grammars."""
        with self._lock:
            if self._structured is None:
                self._structured = StructuredOutputs.from_tokenizer(self.tokenizer)
            return self._structured

    def token_logprobs(self, entries: Sequence[TokenLogprobs]) -> list[TokenLogprob]:
        """Typed :class:`~moai_sdk.results.TokenLogprob` entries (text, bytes) of the decoding core's records."""
        vocab = self.structured.vocab

        def top(tid: int, logprob: float) -> TopLogprob:
            data = vocab.tokens[tid] if 0 <= tid < vocab.size else b""
            special = tid in vocab.special or not 0 <= tid < vocab.size
            text = self.tokenizer.convert_ids_to_tokens(tid) if special else data.decode("utf-8", errors="replace")
            return TopLogprob(token=text, token_id=tid, bytes=list(data), logprob=logprob)

        return [
            TokenLogprob(
                **top(e.token_id, e.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in zip(e.top_ids, e.top_logprobs)],
            )
            for e in entries
        ]

    def _add_outputs(
        self,
        results: list[MoAIResult],
        out: GenerateOutput,
        settings: GenerationSettings,
        constraints: Optional[list[Any]],
    ) -> None:
        """Log-probabilities, parsed structured answers and finish reasons of the results."""
        eos = eos_ids(settings, self.model.config.eos_token_id)
        for r, result in enumerate(results):
            tokens = out.new_tokens[r]
            if out.logprobs is not None and out.logprobs[r] is not None:
                result.logprobs = self.token_logprobs(out.logprobs[r])
            constraint = constraints[r] if constraints else None
            if constraint is not None and constraint.is_terminated():
                result.finish_reason = "stop"
            else:
                uncut = constraint.text if constraint is not None else self._decode(tokens)
                result.finish_reason = finish_reason(uncut, tokens, settings.max_new_tokens, settings.stop, eos)
            if constraint is not None:
                try:
                    result.parsed = constraint.format.parse(result.text)
                except GenerationError as exc:
                    logger.warning("answer %d does not parse (%s); result.parsed is None", r, exc)

    def _prepare(
        self,
        images: Any,
        prompts: Any,
        template: Any,
        perception: Any,
        experts: Any,
        timer: _Timer,
        allow_remote: bool = False,
        raw: bool = False,
        max_new_tokens: Optional[int] = None,
    ) -> _Prepared:
        """Stages 1-3, before the language model: experts, verbalization, preprocess; ``raw`` prompts may hold
        control tokens. With ``max_new_tokens`` the context window is checked first, before any compute."""
        image_list, prompt_list = _broadcast(split_images(images), split_images(prompts))
        template = template if template is not None else self.template
        if max_new_tokens is not None:
            self.processor.check_context(prompt_list, template, max_new_tokens, self.model.config, raw)
        frames, sizes = self._frames(image_list, allow_remote)
        # 1. expert.<name>: each chosen expert on every frame, through the cache (unless perceptions are given)
        if perception is not None:
            perceptions: list[Optional[PerceptionResult]] = list(_given_perceptions(perception, len(frames)))
        elif chosen := select_experts(self.experts, experts):
            perceptions = list(self._runner(chosen).run_frames(frames, sizes, stage=timer.stage))
        else:
            perceptions = [None] * len(frames)
        # 2. verbalization: each perception -> the auxiliary text
        with timer.stage("verbalization"):
            aux_texts = [self.verbalize(p) for p in perceptions]
        # 3. preprocess: prompts, aux texts, frames and panoptic maps -> model inputs
        with timer.stage("preprocess"):
            maps = [p.panoptic_color_map() if p is not None else None for p in perceptions]
            inputs = self.processor(
                frames, prompt_list, aux_texts, maps, template=template, resize=False, allow_special_tokens=raw
            )
        return _Prepared(prompt_list, perceptions, aux_texts, inputs)

    def prepare(
        self,
        image: Any,
        prompt: str,
        *,
        template: Optional[str] = None,
        perception: Any = None,
        experts: Any = None,
        allow_remote: bool = False,
        allow_special_tokens: bool = False,
        max_new_tokens: Optional[int] = None,
    ) -> tuple[_Prepared, dict[str, float]]:
        """Stages 1-3 for one image and one prompt (experts, verbalization, preprocess), exactly as a call runs
        them, and their timings; the continuous-batching engine (:mod:`moai_sdk.engine`) runs this ahead of
        admission. With ``max_new_tokens`` the context window is checked first."""
        if _is_batch(image) or not isinstance(prompt, str):
            raise InputError("prepare() takes one image and one prompt")
        timer = _Timer(self.device)
        raw = bool(allow_special_tokens)
        rows = self._prepare(image, prompt, template, perception, experts, timer, allow_remote, raw, max_new_tokens)
        return rows, timer.timings

    def _generate(
        self,
        inputs: MoAIInputs,
        settings: GenerationSettings,
        timer: _Timer,
        on_token: Optional[TokenCallback],
        **extra: Any,
    ) -> GenerateOutput:
        """Stages 4-7, on the language model: vision, compression, prefill, decode."""
        model = self.model
        inputs = inputs.to(model.device)
        with torch.inference_mode():
            # 4. vision: CLIP tower + projector on the frames
            with timer.stage("vision"):
                image_features = model.encode_images(inputs.pixel_values)
            # 5. compression: verbalization + panoptic map -> the compressed aux tokens the mixers read
            with timer.stage("compression"):
                aux_embeds, aux_mask = model.build_aux_embeds(
                    inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
                )
                compressed = model.compress(aux_embeds, aux_mask).to(image_features.dtype)
        # 6. prefill and 7. decode (timed by generate itself)
        out = model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            im_mask=inputs.im_mask,
            lang_mask=inputs.lang_mask,
            image_features=image_features,
            compressed_aux=compressed,
            generation_config=settings,
            decode=self._decode if settings.stop else None,
            streamer=on_token,
            return_dict=True,
            **extra,
        )
        timer.timings.update({key: float(out.timings.get(key, 0.0)) for key in ("prefill", "decode")})
        return out

    def _encode(self, inputs: MoAIInputs, timer: _Timer) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 4-5: the image features and the compressed auxiliary tokens of ``inputs`` (on the model's device)."""
        model = self.model
        with torch.inference_mode():
            with timer.stage("vision"):
                image_features = model.encode_images(inputs.pixel_values)
            with timer.stage("compression"):
                aux_embeds, aux_mask = model.build_aux_embeds(
                    inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
                )
                compressed = model.compress(aux_embeds, aux_mask).to(image_features.dtype)
        return image_features, compressed

    def score(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        continuations: Sequence[Any],
        *,
        template: Optional[Union[str, Sequence[str]]] = None,
        perception: Any = None,
        experts: Any = None,
        allow_special_tokens: bool = False,
        allow_remote: bool = False,
    ) -> Union[ScoreResult, list[ScoreResult]]:
        """How likely each continuation is as the answer to ``prompts`` about ``images`` (what evaluation
        harnesses call log-likelihood): per continuation the summed and per-token log-probabilities and whether
        greedy decoding would produce it (:class:`~moai_sdk.results.ContinuationScore`).

        ``pipe.score(image, prompt, continuations=["yes", "no"])`` gives a :class:`~moai_sdk.results.ScoreResult`;
        lists of images / prompts give a list, with ``continuations`` one list per row. Each prompt is perceived
        and prefilled once; its cached keys/values are copied per continuation and all continuations of the
        batch run as one forward (:func:`~moai_sdk.modeling.scoring.score_continuations`). A continuation is
        tokenized as text that follows the prompt (:meth:`~moai_sdk.MoAITokenizer.encode_continuation`).
        """
        batch = _is_batch(images) or _is_batch(prompts)
        per_row = _continuation_lists(continuations, batch)
        timer = _Timer(self.device)
        if self._model is None or self._processor is None:
            with timer.stage("load"):
                _ = self.processor, self.model
        t0 = time.perf_counter()
        ids = [[self.tokenizer.encode_continuation(c) for c in conts] for conts in per_row]
        longest = max([len(c) for conts in ids for c in conts] + [1])
        raw = bool(allow_special_tokens)
        rows = self._prepare(images, prompts, template, perception, experts, timer, allow_remote, raw, longest)
        if len(ids) == 1 and len(rows.prompts) > 1:
            ids, per_row = ids * len(rows.prompts), per_row * len(rows.prompts)
        if len(ids) != len(rows.prompts):
            raise InputError(f"{len(rows.prompts)} prompts but {len(ids)} lists of continuations; pass one per prompt")
        inputs = rows.inputs.to(self.model.device)
        image_features, compressed = self._encode(inputs, timer)
        with timer.stage("score"):
            scored = score_continuations(
                self.model,
                inputs.input_ids,
                inputs.attention_mask,
                ids,
                image_features=image_features,
                compressed_aux=compressed,
                im_mask=inputs.im_mask,
                lang_mask=inputs.lang_mask,
            )
        timer.timings["total"] = time.perf_counter() - t0
        revision = self.model.load_info.get("revision") or self.revision
        results = [
            ScoreResult(
                prompt=rows.prompts[i],
                continuations=[
                    ContinuationScore(
                        text=text,
                        logprob=s.logprob,
                        token_logprobs=s.token_logprobs,
                        token_ids=s.token_ids,
                        is_greedy=s.is_greedy,
                    )
                    for text, s in zip(per_row[i], scored[i])
                ],
                perception=rows.perceptions[i],
                aux_text=rows.aux_texts[i],
                token_counts=_token_counts(rows.inputs, i, 0),
                timings=dict(timer.timings),
                model_id=self.model_id,
                revision=revision,
            )
            for i in range(len(rows.prompts))
        ]
        return results if batch else results[0]

    ablate = explain.ablate  # pipe.ablate(image, prompt, experts=None, return_gates=False, **options): one batch

    def stream(self, image: Any, prompt: str, **options: Any) -> Iterator[Union[str, MoAIResult]]:
        """Answer one prompt about one image, yielding text pieces as tokens are generated (they concatenate to
        ``result.text``), then the final :class:`MoAIResult`. Takes the options of :meth:`__call__` (greedy or
        sampling; beam search cannot stream); stopping the iteration early stops the generation."""
        if _is_batch(image) or not isinstance(prompt, str):
            raise InputError("stream() answers one prompt about one image; call the pipeline for batches")
        settings = _stream_settings(self.generation_config, options)
        _ = self.tokenizer  # loaded in this thread before generation starts
        run = functools.partial(self, image, prompt, generation_config=settings, **options)  # run(on_token=...)
        yield from stream_in_thread(run, AnswerStream(self._decode, settings.stop))


__all__ = [
    "MoAIPipeline",
    "resolve_experts",
    "ExpertSpec",
    "DEFAULT_MODEL_ID",
    "DEFAULT_EXPERTS",
    "OFFICIAL_DEMO_GENERATION",
    "OFFICIAL_BENCHMARK_GENERATION",
    "ANSWER_CUT",
]
