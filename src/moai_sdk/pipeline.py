"""`MoAIPipeline`: one object that runs MoAI end to end -- experts, verbalization, vision, compression, generation.

The pipeline is a thin facade. It records its configuration when it is built and loads each component the first
time it is needed (or all at once with :meth:`MoAIPipeline.load`):

* the MoAI language model (:class:`~moai_sdk.modeling.MoAIForCausalLM`, which holds the CLIP vision tower),
* the processor / tokenizer (:class:`~moai_sdk.processing.MoAIProcessor`),
* one perception expert per task (:mod:`moai_sdk.experts`), whose outputs go through an
  :class:`~moai_sdk.cache.ExpertCache` so that several questions about one image run the experts once.

A call follows the official demo: the image is resized to 490 x 490 (:func:`~moai_sdk.imageops.official_resize`),
the experts run on that frame, their results are verbalized with :func:`~moai_sdk.verbalization.verbalize` and
painted into the panoptic colour map, the processor builds the model inputs with the chosen template ("chat" by
default), and the answer is the decoded new tokens (special tokens skipped) cut at the first ``"[U"`` -- as the
official demo cuts at the InternLM2 chat markers -- and at the first stop string.

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

import logging
import os
import queue
import random
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .cache import DEFAULT_CACHE_SIZE, ExpertCache
from .errors import ConfigError, GenerationError, InputError
from .imageops import prepare_frames, split_images
from .prompts import DEFAULT_TEMPLATE, check_template
from .results import TASKS, MoAIResult, PerceptionResult

if TYPE_CHECKING:  # pragma: no cover
    from .experts.base import Expert
    from .modeling import GenerationSettings, MoAIForCausalLM
    from .processing import MoAIInputs, MoAIProcessor
    from .tokenization import MoAITokenizer

logger = logging.getLogger(__name__)

#: The released MoAI checkpoint on the Hugging Face Hub.
DEFAULT_MODEL_ID = "BK-Lee/MoAI-7B"

#: The expert used for each task when ``experts="default"`` (the official MoAI set; OCR runs RapidOCR, the
#: offline PP-OCR engine, instead of PaddleOCR -- pass ``{"ocr": "paddleocr"}`` for the official engine).
DEFAULT_EXPERTS: dict[str, str] = {
    "segmentation": "mask2former",
    "detection": "owlv2",
    "scene_graph": "psgtr",
    "ocr": "rapidocr",
}

#: Generation settings of the official demo (sampling) and of the official benchmark scripts (beam search).
OFFICIAL_DEMO_GENERATION: dict[str, Any] = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "max_new_tokens": 256}
OFFICIAL_BENCHMARK_GENERATION: dict[str, Any] = {"do_sample": False, "num_beams": 3, "max_new_tokens": 128}

#: The official demo cuts the decoded answer at the first occurrence of this text (InternLM2 chat markers).
ANSWER_CUT = "[U"

#: Ways to specify one expert in ``experts=``: a registered name, an instance, or a dict with ``name`` (or
#: ``backend``), optional ``model_id`` / ``revision`` / ``device`` and any backend settings.
ExpertSpec = Union[str, "Expert", Mapping[str, Any], None]

_GENERATION_OPTION_NAMES = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "length_penalty",
    "repetition_penalty",
    "eos_token_id",
    "stop",
    "seed",
)


# ----------------------------------------------------------------------------------------------------------
# expert configuration
# ----------------------------------------------------------------------------------------------------------


def _create(name: str, options: Mapping[str, Any], common: Mapping[str, Any]) -> Expert:
    from .experts.base import create_expert

    return create_expert(name, **{**common, **options})


def _expert_from_spec(spec: ExpertSpec, common: Mapping[str, Any], where: str) -> Expert:
    from .experts.base import Expert

    if isinstance(spec, Expert):
        return spec
    if isinstance(spec, str):
        return _create(spec, {}, common)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        backend = options.pop("backend", None)
        if name is not None and backend is not None and name != backend:
            raise ConfigError(f"{where}: give the expert as 'name' or 'backend', not both ({name!r} vs {backend!r})")
        name = name or backend
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: an expert given as a dict needs 'name' (a registered expert); got {spec!r}")
        return _create(name, options, common)
    raise ConfigError(
        f"{where}: an expert is a registered name, an Expert instance or a dict with 'name'; got {type(spec).__name__}"
    )


def resolve_experts(spec: Any, **common: Any) -> dict[str, Expert]:
    """Build the task -> expert mapping of a pipeline from ``spec``.

    ``spec`` may be:

    * ``"default"`` (or ``...``): :data:`DEFAULT_EXPERTS`;
    * ``None``, ``False`` or an empty list / dict: no experts (the model sees the empty verbalization);
    * a list of registered names and/or :class:`~moai_sdk.experts.base.Expert` instances (one per task);
    * a dict keyed by task (``"segmentation"``, ``"detection"``, ``"scene_graph"``, ``"ocr"``) whose values are
      expert specs (name, instance, or dict with ``name`` plus ``model_id``, ``revision``, settings such as
      thresholds); ``None`` leaves a task out, and so does omitting it (to change one default expert write
      ``{**DEFAULT_EXPERTS, "ocr": "paddleocr"}``). A key may also be a registered expert *name* with a dict
      of options: ``{"owlv2": {"threshold": 0.2}}``.

    ``common`` (device, cache_dir, token, local_files_only, ...) is passed to every expert built here; options
    given per expert win. Raises :class:`ConfigError` for unknown names or two experts for one task.
    """
    from .experts.base import Expert, get_expert_class

    if spec is ... or (isinstance(spec, str) and spec == "default"):
        spec = dict(DEFAULT_EXPERTS)
    if spec is None or spec is False:
        return {}
    built: list[Expert] = []
    if isinstance(spec, (str, Expert)):
        spec = [spec]
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if value is None or value is False:
                continue
            if key in TASKS:
                exp = _expert_from_spec(value, common, f"experts[{key!r}]")
                if exp.task != key:
                    raise ConfigError(f"experts[{key!r}] is {exp.name!r}, an expert for {exp.task!r}")
            elif isinstance(key, str):
                get_expert_class(key)  # ConfigError naming the registered experts
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"experts[{key!r}] must be a dict of options (or None); got {type(value).__name__}"
                    )
                exp = _expert_from_spec({"name": key, **value}, common, f"experts[{key!r}]")
            else:
                raise ConfigError(f"experts keys are tasks {list(TASKS)} or expert names; got {key!r}")
            built.append(exp)
    elif isinstance(spec, (list, tuple)):
        for i, item in enumerate(spec):
            built.append(_expert_from_spec(item, common, f"experts[{i}]"))
    else:
        raise ConfigError(
            "experts must be 'default', None, a list of names/Expert instances or a dict by task; "
            f"got {type(spec).__name__}"
        )
    by_task: dict[str, Expert] = {}
    for exp in built:
        if exp.task in by_task:
            raise ConfigError(
                f"two experts for the {exp.task!r} task ({by_task[exp.task].name!r} and {exp.name!r}); use one per task"
            )
        by_task[exp.task] = exp
    return {t: by_task[t] for t in TASKS if t in by_task}


def _cache_from_option(cache: Any) -> ExpertCache:
    if isinstance(cache, ExpertCache):
        return cache
    if cache is True or cache is None:
        return ExpertCache(DEFAULT_CACHE_SIZE)
    if cache is False:
        return ExpertCache(0)
    if isinstance(cache, int):
        return ExpertCache(cache)
    raise ConfigError(f"cache must be True, False, a size (int >= 0) or an ExpertCache; got {cache!r}")


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _is_batch(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return True
    return isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 4


def _broadcast(images: list[Any], prompts: list[Any]) -> tuple[list[Any], list[Any]]:
    if not images:
        raise InputError("no images given; MoAI answers about exactly one image per prompt")
    if not prompts:
        raise InputError("no prompts given; pass one prompt per image (or one prompt for all images)")
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Collects stage durations (seconds), synchronising CUDA so that GPU work is attributed correctly."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


class _StreamCancelled(Exception):
    """Raised inside the generation thread when the consumer of :meth:`MoAIPipeline.stream` stops early."""


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------


class MoAIPipeline:
    """Image + question -> :class:`~moai_sdk.results.MoAIResult`, with MoAI and its perception experts.

    Build it with :meth:`from_pretrained`; components load on first use. Call it with one image and one prompt
    (-> one result) or with lists (-> a list of results, run as one left-padded batch).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        quantization: Optional[str] = "nf4",
        experts: Any = "default",
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
        from .modeling import GenerationSettings
        from .modeling.loading import resolve_device
        from .modeling.quantization import QUANTIZATION_MODES

        if not isinstance(model, (str, os.PathLike)) or not str(model):
            raise ConfigError(f"model must be a Hub id or a local checkpoint folder; got {model!r}")
        if quantization not in QUANTIZATION_MODES:
            raise ConfigError(f"quantization must be one of {list(QUANTIZATION_MODES)}; got {quantization!r}")
        if on_expert_error not in ("raise", "warn"):
            raise ConfigError(f"on_expert_error must be 'raise' or 'warn'; got {on_expert_error!r}")
        if attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager'; got {attn_implementation!r}")
        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype = dtype
        if quantization is not None and self.device.type != "cuda":
            logger.warning(
                "quantization=%r is for CUDA GPUs (bitsandbytes' CPU 4/8-bit kernels are slow); loading the model "
                "unquantized on %s. To force it, load MoAIForCausalLM.from_pretrained(..., quantization=%r)",
                quantization,
                self.device,
                quantization,
            )
            quantization = None
        self.quantization = quantization
        self.revision = revision
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.local_files_only = bool(local_files_only)
        self.token = token
        self.template = check_template(template)
        self.on_expert_error = on_expert_error
        self.attn_implementation = attn_implementation
        self.corrected_verbalization = bool(corrected_verbalization)
        self.keep_image = bool(keep_image)
        self._runners: dict[tuple[str, ...], Any] = {}  # Perception runner per expert selection
        self.generation_config: GenerationSettings = GenerationSettings.from_any(generation_config)
        self.cache = _cache_from_option(cache)
        self.experts: dict[str, Expert] = resolve_experts(experts, **self._expert_common())
        self._model: Optional[MoAIForCausalLM] = None
        self._processor: Optional[MoAIProcessor] = None
        self._lock = threading.RLock()
        if self.experts and "scene_graph" not in self.experts:
            from .experts.base import SCENE_GRAPH_MISSING_WARNING

            logger.warning(SCENE_GRAPH_MISSING_WARNING)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL_ID,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        quantization: Optional[str] = "nf4",
        experts: Any = "default",
        revision: Optional[str] = None,
        cache_dir: Optional[str | os.PathLike] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        template: str = DEFAULT_TEMPLATE,
        load: bool = False,
        **options: Any,
    ) -> MoAIPipeline:
        """Configure a pipeline; nothing is downloaded or loaded until first use (or ``load=True``).

        Args:
            model: Hub id (default ``"BK-Lee/MoAI-7B"``) or a local checkpoint folder (official layout).
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``; used by the experts too.
            dtype: model dtype, ``"auto"`` = float16 on CUDA, float32 on CPU.
            quantization: ``"nf4"`` (default; the LLM's main weights in 4 bit), ``"nf4-lora"`` (also the PLoRA
                adapters), ``"int8"``, ``"official"`` or ``None``. bitsandbytes needs CUDA: on other devices the model loads unquantized (logged).
            experts: see :func:`resolve_experts` -- ``"default"`` (Mask2Former, OWLv2, PSGTR, RapidOCR), a list
                of names, a dict by task with model ids / backends / thresholds, or ``None`` for no experts.
            revision, cache_dir, local_files_only, token: where the model's files come from (the cache folder,
                offline flag and token apply to the experts as well).
            template: ``"chat"`` (the official benchmark template, default) or ``"demo"``.
            load: load every component now.
            options: ``cache`` (True / False / size / an :class:`~moai_sdk.cache.ExpertCache`),
                ``on_expert_error`` (``"raise"`` or ``"warn"``), ``generation_config`` (defaults for every call),
                ``attn_implementation``, ``corrected_verbalization``, ``keep_image``.
        """
        pipe = cls(
            model,
            device=device,
            dtype=dtype,
            quantization=quantization,
            experts=experts,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            template=template,
            **options,
        )
        if load:
            pipe.load()
        return pipe

    # --- components (lazy) --------------------------------------------------------------------------------

    def _expert_common(self) -> dict[str, Any]:
        common: dict[str, Any] = {"device": self.device, "local_files_only": self.local_files_only}
        if self.cache_dir is not None:
            common["cache_dir"] = self.cache_dir
        if self.token is not None:
            common["token"] = self.token
        return common

    @property
    def model(self) -> MoAIForCausalLM:
        """The MoAI model (loaded on first access)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from .modeling import MoAIForCausalLM

                    t0 = time.perf_counter()
                    self._model = MoAIForCausalLM.from_pretrained(
                        self.model_id,
                        dtype=self.dtype,
                        device=self.device,
                        quantization=self.quantization,
                        revision=self.revision,
                        cache_dir=self.cache_dir,
                        token=self.token,
                        local_files_only=self.local_files_only,
                        attn_implementation=self.attn_implementation,
                    )
                    logger.info("loaded %s in %.1fs", self.model_id, time.perf_counter() - t0)
        return self._model

    @property
    def processor(self) -> MoAIProcessor:
        """The processor (tokenizer + image settings of the checkpoint; loaded on first access)."""
        if self._processor is None:
            with self._lock:
                if self._processor is None:
                    from .processing import MoAIProcessor

                    self._processor = MoAIProcessor.from_pretrained(
                        self.model_id,
                        revision=self.revision,
                        cache_dir=self.cache_dir,
                        token=self.token,
                        local_files_only=self.local_files_only,
                        normalize_dtype=self._compute_dtype(),
                    )
        return self._processor

    @property
    def tokenizer(self) -> MoAITokenizer:
        return self.processor.tokenizer

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The CLIP vision tower inside the model (loads the model)."""
        return self.model.vit

    def _compute_dtype(self) -> torch.dtype:
        """The model's dtype (without loading it): the official normalisation constants follow it."""
        if self._model is not None:
            return self._model.dtype
        from .modeling.loading import resolve_dtype

        return resolve_dtype(self.dtype, self.device)

    @property
    def loaded(self) -> dict[str, bool]:
        """Which components are in memory: ``model``, ``processor`` and ``expert.<name>``."""
        out = {"model": self._model is not None, "processor": self._processor is not None}
        out.update({f"expert.{e.name}": e.is_loaded for e in self.experts.values()})
        return out

    def load(self) -> MoAIPipeline:
        """Load the model, the processor and every expert now; returns ``self``."""
        _ = self.model
        _ = self.processor
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
        from .modeling.loading import resolve_device

        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" are the same card
        with self._lock:
            if self._model is not None and dev != self._model.device:
                if self._model.load_info.get("quantization"):
                    raise ConfigError(
                        "a quantized model cannot be moved between devices; build the pipeline with "
                        f"device={str(dev)!r} instead"
                    )
                self._model.to(dev)
            for exp in self.experts.values():
                if exp.is_loaded:
                    exp.load(dev)
                else:
                    exp.device = dev
            self.device = dev
        return self

    def __repr__(self) -> str:
        state = "loaded" if self._model is not None else "not loaded"
        if self.experts:
            parts = []
            for task, exp in self.experts.items():
                mid = f" {exp.model_id!r}" if exp.model_id else ""
                parts.append(f"{task}: {exp.name}{mid}{' (loaded)' if exp.is_loaded else ''}")
            experts = "{" + ", ".join(parts) + "}"
        else:
            experts = "none"
        return (
            f"MoAIPipeline(model={self.model_id!r}, revision={self.revision!r} [{state}], device={str(self.device)!r}, "
            f"dtype={str(self.dtype).replace('torch.', '')!r}, quantization={self.quantization!r}, "
            f"template={self.template!r}, experts={experts}, cache={self.cache!r})"
        )

    # --- perception -------------------------------------------------------------------------------------------

    def _select_experts(self, experts: Any) -> list[Expert]:
        """The configured experts a call asks for: ``None`` = all, else names or tasks of configured ones."""
        if experts is None:
            return list(self.experts.values())
        if isinstance(experts, str):
            experts = [experts]
        if not isinstance(experts, (list, tuple, set)):
            raise ConfigError(f"experts= for one call is a list of configured expert names or tasks; got {experts!r}")
        by_name = {e.name: e for e in self.experts.values()}
        chosen: list[Expert] = []
        for item in experts:
            exp = self.experts.get(item) or by_name.get(item)
            if exp is None:
                configured = [f"{t} ({e.name})" for t, e in self.experts.items()] or ["none"]
                raise ConfigError(
                    f"expert {item!r} is not configured in this pipeline; configured: {', '.join(configured)}. "
                    "Pass experts= to MoAIPipeline.from_pretrained to add it"
                )
            if exp not in chosen:
                chosen.append(exp)
        return sorted(chosen, key=lambda e: TASKS.index(e.task))

    def _frames(self, images: Sequence[Any]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Official resize of every image: uint8 [3, S, S] frames and the original (width, height)."""
        return prepare_frames(list(images), self._image_size())

    def _image_size(self) -> int:
        if self._processor is not None:
            return self._processor.image_size
        from .imageops import MOAI_IMAGE_SIZE

        return MOAI_IMAGE_SIZE if self._model is None else int(self._model.config.structure.image_size)

    def _run_experts(
        self, frames: list[torch.Tensor], sizes: list[tuple[int, int]], experts: list[Expert], timer: _Timer
    ) -> list[PerceptionResult]:
        """Every chosen expert on every frame (through the shared cache), merged into one result per frame."""
        key = tuple(e.name for e in experts)
        runner = self._runners.get(key)
        if runner is None:
            from .experts.base import Perception

            runner = Perception(
                experts, on_expert_error=self.on_expert_error, keep_image=self.keep_image, cache=self.cache
            )
            self._runners[key] = runner
        return runner.run_frames(frames, sizes, stage=timer.stage)

    def perceive(self, images: Any, *, experts: Any = None) -> Union[PerceptionResult, list[PerceptionResult]]:
        """Run the experts only (no language model): one :class:`PerceptionResult` per image.

        ``images``: one image (PIL, path, bytes, numpy HWC uint8, torch CHW uint8) or a list; ``experts``: a
        subset of the configured experts (names or tasks) for this call.
        """
        chosen = self._select_experts(experts)
        if not chosen:
            raise ConfigError(
                "this pipeline has no experts to run; configure them with MoAIPipeline.from_pretrained(experts=...)"
            )
        batch = _is_batch(images)
        frames, sizes = self._frames(split_images(images))
        if not frames:
            raise InputError("no images given")
        results = self._run_experts(frames, sizes, chosen, _Timer(self.device))
        return results if batch else results[0]

    def verbalize(self, perception: Optional[PerceptionResult]) -> str:
        """The auxiliary text MoAI reads for ``perception`` (official :func:`~moai_sdk.verbalization.verbalize`;
        ``None`` gives the official empty verbalization of three spaces)."""
        from .processing import EMPTY_VERBALIZATION
        from .verbalization import verbalize

        if perception is None:
            return EMPTY_VERBALIZATION
        if not isinstance(perception, PerceptionResult):
            raise InputError(f"verbalize needs a PerceptionResult; got {type(perception).__name__}")
        return verbalize(perception, corrected=self.corrected_verbalization)

    # --- answers ----------------------------------------------------------------------------------------------

    def _settings(self, generation_config: Any, options: dict[str, Any]) -> GenerationSettings:
        from .modeling import GenerationSettings

        base = self.generation_config if generation_config is None else generation_config
        settings = GenerationSettings.from_any(base, **{k: v for k, v in options.items() if v is not None})
        if settings.do_sample and settings.seed is None:
            # Draw the seed here so that the result records it and the answer can be reproduced.
            settings.seed = random.SystemRandom().randrange(2**31)
        return settings

    def _decode_for_stops(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, keep_chat_markers=True)

    def answer_text(self, token_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
        """The answer for generated ``token_ids``: decoded with special tokens skipped (chat markers printed,
        as the official tokenizer does), cut at the first ``"[U"`` like the official demo and at the first stop
        string."""
        text = self._decode_for_stops(token_ids)
        cut = len(text)
        for marker in (ANSWER_CUT, *stop):
            if marker:
                pos = text.find(marker)
                if pos != -1:
                    cut = min(cut, pos)
        return text[:cut]

    def _perceptions_for(
        self, perception: Any, frames: list[torch.Tensor], sizes: list[tuple[int, int]], experts: Any, timer: _Timer
    ) -> list[Optional[PerceptionResult]]:
        n = len(frames)
        if perception is not None:
            given = split_images(perception)
            if len(given) == 1 and n > 1:
                given = given * n
            if len(given) != n:
                raise InputError(f"got {len(given)} precomputed perceptions for {n} images; pass one per image")
            for i, p in enumerate(given):
                if not isinstance(p, PerceptionResult):
                    raise InputError(f"perception[{i}] must be a PerceptionResult; got {type(p).__name__}")
            return list(given)
        chosen = self._select_experts(experts)
        if not chosen:
            return [None] * n
        return list(self._run_experts(frames, sizes, chosen, timer))

    def _prepare(
        self, images: Any, prompts: Any, *, template: Any, perception: Any, experts: Any, timer: _Timer
    ) -> tuple[bool, list[str], list[Optional[PerceptionResult]], list[str], MoAIInputs]:
        batch = _is_batch(images) or _is_batch(prompts)
        image_list, prompt_list = _broadcast(split_images(images), split_images(prompts))
        for i, p in enumerate(prompt_list):
            if not isinstance(p, str):
                raise InputError(f"prompt {i} must be a str; got {type(p).__name__}")
        templates = template if template is not None else self.template
        processor = self.processor
        frames, sizes = self._frames(image_list)
        perceptions = self._perceptions_for(perception, frames, sizes, experts, timer)
        with timer.stage("verbalization"):
            aux_texts = [self.verbalize(p) for p in perceptions]
        with timer.stage("preprocess"):
            maps = [p.panoptic_color_map() if p is not None else None for p in perceptions]
            inputs = processor(frames, prompt_list, aux_texts, maps, template=templates, resize=False)
        return batch, prompt_list, perceptions, aux_texts, inputs

    def _generate(
        self,
        inputs: MoAIInputs,
        settings: GenerationSettings,
        timer: _Timer,
        streamer: Optional[Callable[[torch.Tensor], None]] = None,
    ) -> Any:
        model = self.model
        inputs = inputs.to(model.device)
        with torch.inference_mode():
            with timer.stage("vision"):
                image_features = model.encode_images(inputs.pixel_values)
            with timer.stage("compression"):
                aux_embeds, aux_mask = model.build_aux_embeds(
                    inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
                )
                compressed = model.compress(aux_embeds, aux_mask).to(image_features.dtype)
        out = model.generate(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            im_mask=inputs.im_mask,
            lang_mask=inputs.lang_mask,
            image_features=image_features,
            compressed_aux=compressed,
            generation_config=settings,
            decode=self._decode_for_stops if settings.stop else None,
            streamer=streamer,
            return_dict=True,
        )
        timer.timings["prefill"] = float(out.timings.get("prefill", 0.0))
        timer.timings["decode"] = float(out.timings.get("decode", 0.0))
        return out

    def _results(
        self,
        out: Any,
        inputs: MoAIInputs,
        prompts: list[str],
        perceptions: list[Optional[PerceptionResult]],
        aux_texts: list[str],
        settings: GenerationSettings,
        timings: dict[str, float],
    ) -> list[MoAIResult]:
        revision = self.revision
        if self._model is not None and self._model.load_info.get("revision"):
            revision = self._model.load_info["revision"]
        results = []
        for i, new in enumerate(out.new_tokens):
            prompt_tokens = int(inputs.attention_mask[i].sum()) - 1  # the <image> placeholder is not text
            counts = {
                "prompt": prompt_tokens,
                "image": int(inputs.num_image_tokens),
                "aux": int(inputs.aux_attention_mask[i].sum()),
                "generated": len(new),
            }
            counts["context"] = counts["prompt"] + counts["image"]
            results.append(
                MoAIResult(
                    text=self.answer_text(new, settings.stop),
                    prompt=prompts[i],
                    perception=perceptions[i],
                    aux_text=aux_texts[i],
                    token_counts=counts,
                    timings=dict(timings),
                    model_id=self.model_id,
                    revision=revision,
                    seed=settings.seed,
                    generation=settings.to_dict(),
                    new_token_ids=[int(t) for t in new],
                )
            )
        return results

    def __call__(
        self,
        images: Any,
        prompts: Union[str, Sequence[str]],
        *,
        generation_config: Any = None,
        template: Optional[Union[str, Sequence[str]]] = None,
        perception: Any = None,
        experts: Any = None,
        max_new_tokens: Optional[int] = None,
        do_sample: Optional[bool] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        num_beams: Optional[int] = None,
        length_penalty: Optional[float] = None,
        repetition_penalty: Optional[float] = None,
        eos_token_id: Optional[Union[int, list[int]]] = None,
        stop: Optional[Union[str, Sequence[str]]] = None,
        seed: Optional[int] = None,
    ) -> Union[MoAIResult, list[MoAIResult]]:
        """Answer ``prompts`` about ``images``.

        One image and one prompt give a :class:`MoAIResult`; a list of images and/or prompts (one each, or one
        shared) gives a list, computed as one left-padded batch. Options:

        * generation: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``num_beams``,
          ``length_penalty``, ``repetition_penalty``, ``eos_token_id``, ``stop`` (strings that end the answer),
          ``seed`` (sampling is reproducible with it; when sampling without one, a seed is drawn and recorded),
          or ``generation_config`` (:class:`~moai_sdk.modeling.GenerationSettings`, a dict or a transformers
          ``GenerationConfig``) -- the keyword options override it;
        * ``template``: ``"chat"`` / ``"demo"`` (or one per row);
        * ``perception``: precomputed :class:`PerceptionResult` (one, or one per image) -- the experts do not run;
        * ``experts``: a subset of the configured experts (names or tasks) for this call; ``[]`` for none.
        """
        options = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            stop=[stop] if isinstance(stop, str) else stop,
            seed=seed,
        )
        results, batch = self._run(images, prompts, generation_config, options, template, perception, experts, None)
        return results if batch else results[0]

    def _run(
        self,
        images: Any,
        prompts: Any,
        generation_config: Any,
        options: dict[str, Any],
        template: Any,
        perception: Any,
        experts: Any,
        streamer: Optional[Callable[[torch.Tensor], None]],
    ) -> tuple[list[MoAIResult], bool]:
        settings = self._settings(generation_config, options)
        timer = _Timer(self.device)
        if self._model is None or self._processor is None:
            with timer.stage("load"):  # one-off, kept out of "total"
                _ = self.processor
                _ = self.model
        t0 = time.perf_counter()
        batch, prompt_list, perceptions, aux_texts, inputs = self._prepare(
            images, prompts, template=template, perception=perception, experts=experts, timer=timer
        )
        out = self._generate(inputs, settings, timer, streamer)
        timer.timings["total"] = time.perf_counter() - t0
        return self._results(out, inputs, prompt_list, perceptions, aux_texts, settings, timer.timings), batch

    # --- streaming --------------------------------------------------------------------------------------------

    def stream(self, image: Any, prompt: str, **options: Any) -> Iterator[Union[str, MoAIResult]]:
        """Answer one prompt about one image, yielding text pieces as tokens are generated, then the final
        :class:`MoAIResult`. The pieces concatenate to ``result.text``.

        Takes the options of :meth:`__call__` (greedy or sampling; beam search cannot stream). Stopping the
        iteration early stops the generation.
        """
        if _is_batch(image) or not isinstance(prompt, str):
            raise InputError("stream() answers one prompt about one image; call the pipeline for batches")
        call_keys = {"generation_config", "template", "perception", "experts"}
        unknown = set(options) - call_keys - set(_GENERATION_OPTION_NAMES)
        if unknown:
            raise GenerationError(f"unknown option(s) {sorted(unknown)} for stream()")
        gen_options = {k: v for k, v in options.items() if k in _GENERATION_OPTION_NAMES}
        if isinstance(gen_options.get("stop"), str):
            gen_options["stop"] = [gen_options["stop"]]
        settings = self._settings(options.get("generation_config"), gen_options)
        if settings.num_beams > 1:
            raise GenerationError("beam search (num_beams > 1) cannot stream; use num_beams=1 or call the pipeline")
        _ = self.tokenizer  # load the tokenizer in this thread before generation starts

        events: queue.Queue = queue.Queue()
        cancel = threading.Event()

        def on_token(ids: torch.Tensor) -> None:
            if cancel.is_set():
                raise _StreamCancelled()
            events.put(("token", int(ids[0])))

        def work() -> None:
            try:
                results, _ = self._run(
                    image,
                    prompt,
                    settings,
                    {},
                    options.get("template"),
                    options.get("perception"),
                    options.get("experts"),
                    on_token,
                )
                events.put(("done", results[0]))
            except _StreamCancelled:
                events.put(("cancelled", None))
            except BaseException as exc:  # handed to the consumer thread, which raises it
                events.put(("error", exc))

        worker = threading.Thread(target=work, name="moai-stream", daemon=True)
        worker.start()
        emitted = ""
        tokens: list[int] = []
        try:
            while True:
                kind, payload = events.get()
                if kind == "token":
                    tokens.append(payload)
                    safe = self._stable_prefix(tokens, settings.stop)
                    if len(safe) > len(emitted) and safe.startswith(emitted):
                        yield safe[len(emitted) :]
                        emitted = safe
                elif kind == "done":
                    result: MoAIResult = payload
                    if result.text.startswith(emitted):
                        if len(result.text) > len(emitted):
                            yield result.text[len(emitted) :]
                    else:
                        logger.warning("streamed text diverged from the final answer; trust result.text")
                    yield result
                    return
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            cancel.set()
            worker.join()

    def _stable_prefix(self, tokens: list[int], stop: Sequence[str]) -> str:
        """The part of the answer so far that later tokens cannot change: no trailing incomplete character,
        and nothing that could still turn into ``"[U"`` or a stop string."""
        text = self.answer_text(tokens, stop)
        text = text.rstrip("\ufffd")
        hold = 0
        for marker in (ANSWER_CUT, *stop):
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold] if hold else text


__all__ = [
    "MoAIPipeline",
    "resolve_experts",
    "DEFAULT_MODEL_ID",
    "DEFAULT_EXPERTS",
    "OFFICIAL_DEMO_GENERATION",
    "OFFICIAL_BENCHMARK_GENERATION",
    "ANSWER_CUT",
]
