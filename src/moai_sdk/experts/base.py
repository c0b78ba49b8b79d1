"""The perception-expert interface, the expert registry and the :class:`Perception` runner.

An expert wraps one perception model for one task (``segmentation``, ``detection``, ``scene_graph`` or
``ocr``). It receives images already in the expert frame (uint8 RGB ``[3, H, W]`` tensors; the runner applies
the official 490 x 490 resize first) and returns one :class:`~moai_sdk.results.PerceptionResult` per image
that fills only its task's fields.

Writing an expert::

    @register_expert
    class MyOCR(Expert):
        name = "my-ocr"
        task = "ocr"
        default_model_id = None

        class Settings(ExpertSettings):  # typed options: a bad value raises ConfigError naming the field
            min_score: UnitFloat = 0.5

        def _load(self):
            self.model = build_my_model(self.model_id, device=self.device)

        def _predict(self, images):
            return [self.make_result(img, text_lines=[...]) for img in images]

Models load lazily: the first :meth:`Expert.predict` calls :meth:`Expert.load`. :meth:`Expert.download_plan` /
:meth:`Expert.prefetch` say how and fetch the weights ahead of time (``moai download``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, ContextManager, Literal, Mapping, Optional, Sequence, Union

import torch
from pydantic import BaseModel, ValidationError

from .. import hub as hubio
from ..cache import ExpertCache, image_digest
from ..errors import ConfigError, ExpertError, InputError, MoAIError
from ..hub import HubOptions, HubSettings
from ..imageops import MOAI_IMAGE_SIZE, prepare_frames
from ..results import TASKS, PerceptionResult
from .settings import settings_from_defaults, validate_settings
from .weights import is_local

logger = logging.getLogger(__name__)

#: Modules that define the built-in experts; imported (when present) before the registry is read.
_BUILTIN_MODULES: tuple[str, ...] = (
    "moai_sdk.experts.segmentation",
    "moai_sdk.experts.detection",
    "moai_sdk.experts.scene_graph",
    "moai_sdk.experts.ocr",
)

SCENE_GRAPH_MISSING_WARNING = (
    "scene graph expert not configured: the scene-graph part of the verbalization stays empty "
    "(the official MoAI pipeline always runs PSGTR)"
)


def _as_frames(images: Any) -> list[torch.Tensor]:
    """Validate expert input: a sequence of uint8 [3, H, W] tensors (or one such tensor / a [B, 3, H, W])."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = [images]
        elif images.ndim == 4:
            images = list(images)
        else:
            raise InputError(f"expert input tensors must be [3, H, W] or [B, 3, H, W]; got {tuple(images.shape)}")
    if not isinstance(images, (list, tuple)):
        raise InputError(
            f"experts take a list of uint8 [3, H, W] tensors; got {type(images).__name__} "
            "(use moai_sdk.Perception to run experts on arbitrary images)"
        )
    frames = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            desc = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
            raise InputError(
                f"expert image {i} must be a uint8 RGB tensor [3, H, W]; got {desc}. "
                "Use moai_sdk.imageops.prepare_image(image) to convert"
            )
        frames.append(img)
    return frames


def frame_result(frame: torch.Tensor, **fields: Any) -> PerceptionResult:
    """A :class:`PerceptionResult` for ``frame`` (uint8 ``[3, H, W]``) holding ``fields``: image and frame sizes
    are the frame's. The one place results of a single expert are built (:meth:`Expert.make_result` wraps it)."""
    h, w = int(frame.shape[-2]), int(frame.shape[-1])
    return PerceptionResult(image_width=w, image_height=h, frame_width=w, frame_height=h, **fields)


class Expert(HubSettings, ABC):
    """Base class of perception experts.

    Class attributes: ``name`` (registry name), ``task`` (one of :data:`~moai_sdk.results.TASKS`),
    ``default_model_id`` (weights used when ``model_id`` is not given) and ``Settings`` (a Pydantic model of the
    backend's options, see :mod:`moai_sdk.experts.settings`) -- or, for simple experts, ``default_settings`` (a dict
    of options with their defaults; when non-empty, other keys are rejected). ``hub`` (a
    :class:`~moai_sdk.hub.HubOptions`) says where weights come from; the legacy ``revision`` / ``cache_dir`` /
    ``token`` / ``local_files_only`` keywords are folded into it.

    Subclasses implement :meth:`_load` (build the model on ``self.device`` / ``self.dtype``) and
    :meth:`_predict` (frames -> results), and may override :meth:`_unload` (default: drop ``self.model``).
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = ""
    default_model_id: ClassVar[Optional[str]] = None
    #: The typed settings model (a :class:`~moai_sdk.experts.settings.ExpertSettings` subclass). Experts that only
    #: give ``default_settings`` get a model derived from that dict.
    Settings: ClassVar[Optional[type[BaseModel]]] = None
    default_settings: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Settings" in cls.__dict__ and cls.Settings is not None:
            cls.default_settings = cls.Settings().model_dump()

    def __init__(
        self,
        model_id: Optional[str] = None,
        *,
        hub: Union[HubOptions, Mapping[str, Any], None] = None,
        revision: Optional[str] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        cache_dir: Optional[str] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        **settings: Any,
    ) -> None:
        cls = type(self)
        if not cls.name or cls.task not in TASKS:
            raise ConfigError(
                f"{cls.__name__} must set class attributes name (non-empty) and task (one of {list(TASKS)}); "
                f"got name={cls.name!r}, task={cls.task!r}"
            )
        self.model_id: Optional[str] = model_id if model_id is not None else cls.default_model_id
        self.hub: HubOptions = HubOptions.from_any(
            hub, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only or None
        )
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        #: The validated settings (a Pydantic model); :attr:`settings` is the same as a plain dict.
        self.typed_settings: BaseModel = validate_settings(cls.name, cls.settings_model(), settings)
        self.settings: dict[str, Any] = self.typed_settings.model_dump()
        self.model: Any = None
        self._loaded = False
        self._lock = threading.RLock()

    @classmethod
    def settings_model(cls) -> type[BaseModel]:
        """The class's settings model: ``Settings``, else one derived from ``default_settings``."""
        return cls.Settings if cls.Settings is not None else settings_from_defaults(cls, cls.default_settings)

    # --- lifecycle ----------------------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._loaded

    def load(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> Expert:
        """Load the model and return ``self``. Loading happens once: later calls return at once unless they
        ask for another device or dtype, which reloads the model.

        ``device`` defaults to the one given at construction, else CUDA when available, else CPU.
        """
        with self._lock:
            want_device = torch.device(device) if device is not None else self.device
            if want_device is None:
                want_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            want_dtype = dtype if dtype is not None else self.dtype
            if self._loaded and (want_device != self.device or want_dtype != self.dtype):
                self.unload()
            if self._loaded:
                return self
            self.device, self.dtype = want_device, want_dtype
            t0 = time.perf_counter()
            try:
                self._load()
            except MoAIError:
                raise
            except Exception as exc:
                raise ExpertError(self.name, f"loading {self.model_id!r} failed: {type(exc).__name__}: {exc}") from exc
            self._loaded = True
            logger.info(
                "loaded expert %s (%s) on %s in %.2fs", self.name, self.model_id, self.device, time.perf_counter() - t0
            )
            return self

    def unload(self) -> None:
        """Free the model; the next :meth:`predict` loads it again."""
        with self._lock:
            if self._loaded:
                self._unload()
                self._loaded = False
                logger.info("unloaded expert %s", self.name)

    def to(self, device: Union[str, torch.device]) -> Expert:
        """Use ``device`` from now on: a loaded model is loaded again there, an unloaded one will load there."""
        with self._lock:
            if self._loaded:
                return self.load(device)
            self.device = torch.device(device)
            return self

    @property
    def compute_device_type(self) -> str:
        """Where this expert computes (``"cuda"``, ``"cpu"``, ...): the device it is or will be loaded on.

        :class:`Perception`'s ``concurrent="auto"`` overlaps CPU experts with accelerator ones; an expert whose
        model always runs on the CPU whatever its ``device`` (e.g. onnxruntime) overrides this.
        """
        if self.device is not None:
            return self.device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    def cache_key(self) -> str:
        """A string that identifies this expert's outputs: name, model id, revision and settings."""
        payload = {
            "expert": self.name,
            "task": self.task,
            "model_id": self.model_id,
            "revision": self.revision,
            "settings": self.settings,
        }
        return json.dumps(payload, sort_keys=True, default=repr)

    # --- weights ----------------------------------------------------------------------------------------------

    def download_plan(self) -> dict[str, Any]:
        """What fetching this expert's weights ahead of time means (``moai download`` prints and runs it).

        Keys: ``component`` (``expert.<name>``), ``task``, ``repo_id``, ``revision`` and ``method``: ``"local"``
        (``model_id`` is an existing path), ``"snapshot"`` (files of a Hub repo: ``allow_patterns``, and
        ``fallback_patterns`` used when the repo has no safetensors), ``"file"`` (the first of ``filenames`` that
        the repo has, with ``repo_type``), ``"bundled"`` (shipped with a package) or ``"load"`` (the backend
        fetches its own files: load the model once). Subclasses describe their Hub layout in :meth:`_hub_plan`.
        """
        entry: dict[str, Any] = {
            "component": f"expert.{self.name}",
            "task": self.task,
            "repo_id": self.model_id,
            "revision": self.revision,
        }
        if is_local(self.model_id):
            entry["method"] = "local"
        else:
            entry.update(self._hub_plan() or {"method": "load"})
        return entry

    def _hub_plan(self) -> Optional[dict[str, Any]]:
        """The ``method`` and its fields for a ``model_id`` that is not a local path; ``None`` = ``"load"``."""
        return None

    def prefetch(self) -> dict[str, Any]:
        """Fetch what :meth:`download_plan` lists into the Hub cache (``self.hub``); returns a status dict.

        The status has ``component``, ``method``, ``repo_id`` and either ``path`` (what was fetched) or
        ``reason`` (why nothing was). Failures raise :class:`~moai_sdk.errors.CheckpointError` (or, for
        ``"load"``, whatever loading raises).
        """
        plan = self.download_plan()
        method = plan["method"]
        status: dict[str, Any] = {"component": plan["component"], "method": method, "repo_id": plan["repo_id"]}
        if method == "snapshot":
            path = hubio.snapshot(
                plan["repo_id"], plan["allow_patterns"], plan.get("fallback_patterns"), hub=self._plan_hub(plan)
            )
            status["path"] = str(path)
        elif method == "file":
            path = hubio.download_first(
                plan["repo_id"], plan["filenames"], hub=self._plan_hub(plan), repo_type=plan.get("repo_type")
            )
            status["path"] = str(path)
        elif method == "load":
            was_loaded = self.is_loaded
            self.load(self.device or "cpu")
            if not was_loaded:
                self.unload()
            status["reason"] = "loaded once (the backend fetches its own files)"
        elif method == "local":
            status["path"] = str(self.model_id)
        else:
            status["reason"] = "bundled with its package: nothing to download"
        return status

    def _plan_hub(self, plan: Mapping[str, Any]) -> HubOptions:
        return self.hub.replace(revision=plan.get("revision"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model_id={self.model_id!r}, loaded={self._loaded})"

    # --- inference ----------------------------------------------------------------------------------------

    def make_result(self, image: torch.Tensor, **fields: Any) -> PerceptionResult:
        """A validated result for ``image`` (a frame) holding ``fields`` (e.g. ``detections=[...]``).

        The frame and image sizes are the frame's (the runner fills in the original image size). Invalid
        fields raise :class:`ExpertError` naming this expert.
        """
        try:
            return frame_result(image, **fields)
        except ValidationError as exc:
            raise ExpertError(self.name, f"invalid result: {exc}") from exc

    def predict(self, images: Sequence[torch.Tensor]) -> list[PerceptionResult]:
        """Run the expert on frames (uint8 RGB ``[3, H, W]``); one result per image, in order.

        Each result holds only this expert's task, ``sources[task] = name`` and ``timings[name]`` = the
        batch time divided by the number of images. Failures of the backend raise :class:`ExpertError`.
        """
        frames = _as_frames(images)
        if not frames:
            return []
        self.load()
        t0 = time.perf_counter()
        with self._lock:
            try:
                results = self._predict(frames)
            except MoAIError:
                raise
            except Exception as exc:
                raise ExpertError(self.name, f"{type(exc).__name__}: {exc}") from exc
        per_image = (time.perf_counter() - t0) / len(frames)
        results = self._check_results(frames, results)
        out = []
        for res in results:
            sources = {**res.sources, self.task: self.name}
            timings = {**res.timings, self.name: per_image}
            out.append(res.model_copy(update={"sources": sources, "timings": timings}))
        return out

    def _check_results(self, frames: list[torch.Tensor], results: Any) -> list[PerceptionResult]:
        if not isinstance(results, (list, tuple)) or len(results) != len(frames):
            got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
            raise ExpertError(
                self.name, f"_predict must return one PerceptionResult per image ({len(frames)}); got {got}"
            )
        for i, (img, res) in enumerate(zip(frames, results)):
            if not isinstance(res, PerceptionResult):
                raise ExpertError(self.name, f"result {i} is a {type(res).__name__}, not a PerceptionResult")
            h, w = int(img.shape[-2]), int(img.shape[-1])
            if (res.frame_height, res.frame_width) != (h, w):
                raise ExpertError(
                    self.name,
                    f"result {i} has frame {res.frame_width}x{res.frame_height} but the image is {w}x{h}",
                )
            foreign = [t for t in TASKS if t != self.task and res.has_task(t)]
            if foreign:
                raise ExpertError(self.name, f"a {self.task} expert filled other task(s) {foreign}")
        return list(results)

    # --- hooks for subclasses -------------------------------------------------------------------------------

    @abstractmethod
    def _load(self) -> None:
        """Build / download the model onto ``self.device`` (``self.dtype``); store it (e.g. in ``self.model``)."""

    @abstractmethod
    def _predict(self, images: list[torch.Tensor]) -> list[PerceptionResult]:
        """Frames in (uint8 RGB [3, H, W]), one :class:`PerceptionResult` per frame out."""

    def _unload(self) -> None:
        """Release what :meth:`_load` built; the default drops ``self.model``."""
        self.model = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Expert]] = {}
_REGISTRY_LOCK = threading.Lock()


def check_on_expert_error(value: Any) -> str:
    """``value`` if it is an ``on_expert_error`` policy (``"raise"`` or ``"warn"``), else a :class:`ConfigError`."""
    if value not in ("raise", "warn"):
        raise ConfigError(f"on_expert_error must be 'raise' or 'warn'; got {value!r}")
    return value


def register_expert(cls: Optional[type[Expert]] = None, *, replace: bool = False):
    """Register an :class:`Expert` subclass under its ``name``; usable as ``@register_expert``.

    Raises :class:`ConfigError` for a non-Expert class, a missing name, an unknown task, an abstract class,
    or a name already taken by another class (pass ``replace=True`` to override it).
    """

    def do_register(klass: type[Expert]) -> type[Expert]:
        if not (isinstance(klass, type) and issubclass(klass, Expert)):
            raise ConfigError(f"register_expert needs an Expert subclass; got {klass!r}")
        if not isinstance(klass.name, str) or not klass.name:
            raise ConfigError(f"{klass.__name__} has no name; set the class attribute name = '...'")
        if klass.task not in TASKS:
            raise ConfigError(f"{klass.__name__}.task is {klass.task!r}; it must be one of {list(TASKS)}")
        abstract = sorted(getattr(klass, "__abstractmethods__", ()))
        if abstract:
            raise ConfigError(f"{klass.__name__} does not implement {abstract}")
        with _REGISTRY_LOCK:
            existing = _REGISTRY.get(klass.name)
            if existing is not None and existing is not klass and not replace:
                raise ConfigError(
                    f"an expert named {klass.name!r} is already registered ({existing.__module__}."
                    f"{existing.__qualname__}); choose another name or pass replace=True"
                )
            _REGISTRY[klass.name] = klass
        return klass

    if cls is None:
        return do_register
    return do_register(cls)


def unregister_expert(name: str) -> None:
    """Remove a registered expert (no error when it is not registered)."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(name, None)


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def available_experts() -> dict[str, list[str]]:
    """Registered expert names by task: ``{"segmentation": [...], "detection": [...], ...}``."""
    _import_builtins()
    out: dict[str, list[str]] = {t: [] for t in TASKS}
    with _REGISTRY_LOCK:
        for name, klass in _REGISTRY.items():
            out[klass.task].append(name)
    return {t: sorted(names) for t, names in out.items()}


def get_expert_class(name: str) -> type[Expert]:
    """The class registered as ``name``; :class:`ConfigError` listing the available ones otherwise."""
    _import_builtins()
    with _REGISTRY_LOCK:
        klass = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if klass is None:
        raise ConfigError(f"unknown expert {name!r}; available experts: {known or 'none registered'}")
    return klass


def create_expert(name: str, **kwargs: Any) -> Expert:
    """Instantiate the expert registered as ``name`` with ``kwargs`` (model_id, device, settings, ...)."""
    if not isinstance(name, str):
        raise ConfigError(f"expert names are strings; got {type(name).__name__}")
    return get_expert_class(name)(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------------------


class Perception:
    """Run a set of experts (at most one per task) on images and merge their results.

    Args:
        experts: :class:`Expert` instances or registered names (created with default settings).
        on_expert_error: ``"raise"`` raises :class:`ExpertError` naming the failing expert; ``"warn"``
            records ``"expert '<name>' failed: ..."`` in each result's ``warnings`` and keeps the other parts.
        concurrent: how experts are scheduled (each expert always gets the whole batch). ``"auto"``: experts on an
            accelerator run one after another in the calling thread while the CPU experts (e.g. OCR) run in one
            background thread at the same time -- GPU experts sharing a GPU only slow each other down, but CPU work
            need not wait for them; with experts on one kind of device only, this is ``False``. ``True``: every
            expert in its own thread. ``False``: one after another.
        max_workers: thread count when ``concurrent=True`` (default: one per expert).
        keep_image: keep the 490 x 490 frame in ``PerceptionResult.frame_image`` (for plotting).
        frame_size: side of the expert frame (490 = the official demo).
        cache_size: keep up to this many per-image, per-expert results keyed by frame hash and
            :meth:`Expert.cache_key` (0 = no cache).
        cache: an :class:`~moai_sdk.cache.ExpertCache` to use (and share) instead of a new one of ``cache_size``.
    """

    def __init__(
        self,
        experts: Sequence[Union[Expert, str]] = (),
        *,
        on_expert_error: Literal["raise", "warn"] = "raise",
        concurrent: Union[bool, Literal["auto"]] = "auto",
        max_workers: Optional[int] = None,
        keep_image: bool = True,
        frame_size: int = MOAI_IMAGE_SIZE,
        cache_size: int = 0,
        cache: Optional[ExpertCache] = None,
    ) -> None:
        check_on_expert_error(on_expert_error)
        if isinstance(experts, (str, Expert)):
            experts = [experts]
        built: list[Expert] = []
        for item in experts:
            if isinstance(item, str):
                built.append(create_expert(item))
            elif isinstance(item, Expert):
                built.append(item)
            else:
                raise ConfigError(f"experts must be Expert instances or registered names; got {type(item).__name__}")
        by_task: dict[str, str] = {}
        for exp in built:
            if exp.task not in TASKS:
                raise ConfigError(f"expert {exp.name!r} has task {exp.task!r}; tasks are {list(TASKS)}")
            if exp.task in by_task:
                raise ConfigError(
                    f"two experts for the {exp.task!r} task ({by_task[exp.task]!r} and {exp.name!r}); "
                    "use one expert per task"
                )
            by_task[exp.task] = exp.name
        if int(frame_size) <= 0 or int(cache_size) < 0:
            raise ConfigError(f"frame_size must be > 0 and cache_size >= 0; got {frame_size}, {cache_size}")
        self.experts: list[Expert] = sorted(built, key=lambda e: TASKS.index(e.task))
        self.on_expert_error = on_expert_error
        if concurrent not in (True, False, "auto"):
            raise ConfigError(f"concurrent must be True, False or 'auto'; got {concurrent!r}")
        self.concurrent: Union[bool, Literal["auto"]] = concurrent
        self.max_workers = max_workers
        self.keep_image = keep_image
        self.frame_size = int(frame_size)
        self.cache = cache if cache is not None else ExpertCache(int(cache_size))
        self.warnings: list[str] = []
        if "scene_graph" not in by_task:
            self.warnings.append(SCENE_GRAPH_MISSING_WARNING)
            logger.warning(SCENE_GRAPH_MISSING_WARNING)

    @property
    def tasks(self) -> dict[str, str]:
        """Configured task -> expert name."""
        return {e.task: e.name for e in self.experts}

    def load(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> Perception:
        """Load every expert now instead of at the first call."""
        for exp in self.experts:
            exp.load(device, dtype)
        return self

    def unload(self) -> None:
        for exp in self.experts:
            exp.unload()

    def clear_cache(self) -> None:
        self.cache.clear()

    def __repr__(self) -> str:
        return f"Perception(experts={[e.name for e in self.experts]}, on_expert_error={self.on_expert_error!r})"

    # --- running ------------------------------------------------------------------------------------------

    def prepare(self, images: Any) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Load images and apply the official resize: frames [3, S, S] and original (width, height)."""
        return prepare_frames(images, self.frame_size)

    def __call__(self, images: Any) -> list[PerceptionResult]:
        """Run all experts on ``images`` (one image or a list of any :data:`~moai_sdk.imageops.ImageInput`)."""
        frames, sizes = self.prepare(images)
        return self.run_frames(frames, sizes)

    def run_frames(
        self,
        frames: Sequence[torch.Tensor],
        sizes: Optional[Sequence[tuple[int, int]]] = None,
        *,
        stage: Optional[Callable[[str], ContextManager[Any]]] = None,
    ) -> list[PerceptionResult]:
        """Run the experts on frames already in the expert frame; ``sizes`` = original (width, height).

        ``stage(name)``, when given, is a context manager wrapped around each expert's run (``"expert.<name>"``),
        e.g. a timer.
        """
        frames = _as_frames(list(frames))
        if sizes is None:
            sizes = [(int(f.shape[2]), int(f.shape[1])) for f in frames]
        if len(sizes) != len(frames):
            raise InputError(f"got {len(sizes)} image sizes for {len(frames)} frames")
        digests = [image_digest(f) for f in frames]
        stage = stage or (lambda name: contextlib.nullcontext())
        parts: dict[str, list[PerceptionResult]] = {}
        failures: dict[str, BaseException] = {}
        foreground, background = self.schedule()

        def run_serially(experts: list[Expert]) -> None:
            for exp in experts:
                try:
                    parts[exp.name] = self._run_one(exp, frames, digests, stage)
                except Exception as exc:  # collected, then raised or recorded below
                    failures[exp.name] = exc
                    if self.on_expert_error == "raise":
                        break

        if self.concurrent is True and len(self.experts) > 1:
            workers = self.max_workers or len(self.experts)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moai-expert") as pool:
                futures = {e.name: pool.submit(self._run_one, e, frames, digests, stage) for e in self.experts}
                for exp in self.experts:
                    try:
                        parts[exp.name] = futures[exp.name].result()
                    except Exception as exc:
                        failures[exp.name] = exc
        elif background:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moai-expert-cpu") as pool:
                pending = pool.submit(run_serially, background)
                run_serially(foreground)
                pending.result()
        else:
            run_serially(self.experts)
        if failures and self.on_expert_error == "raise":
            name = next(e.name for e in self.experts if e.name in failures)
            exc = failures[name]
            if isinstance(exc, ExpertError):
                raise exc
            raise ExpertError(name, f"{type(exc).__name__}: {exc}") from exc

        results = []
        for i, (frame, (width, height)) in enumerate(zip(frames, sizes)):
            fh, fw = int(frame.shape[1]), int(frame.shape[2])
            warnings = list(self.warnings)
            for exp in self.experts:
                if exp.name in failures:
                    msg = f"expert {exp.name!r} failed: {failures[exp.name]}"
                    warnings.append(msg)
                    logger.warning(msg)
            merged = PerceptionResult(
                image_width=width,
                image_height=height,
                frame_width=fw,
                frame_height=fh,
                warnings=warnings,
                frame_image=frame.permute(1, 2, 0).contiguous().numpy() if self.keep_image else None,
            )
            for exp in self.experts:
                if exp.name in parts:
                    part = parts[exp.name][i].model_copy(
                        update={"image_width": width, "image_height": height, "frame_image": None}
                    )
                    merged = merged.merge(part)
            results.append(merged)
        return results

    def schedule(self) -> tuple[list[Expert], list[Expert]]:
        """How :meth:`run_frames` splits the experts under ``concurrent="auto"``: (experts run in the calling
        thread, experts run meanwhile in a background thread). The background list is empty unless the experts
        sit on both the CPU and an accelerator, or when ``concurrent`` is not ``"auto"``."""
        if self.concurrent != "auto":
            return list(self.experts), []
        cpu = [e for e in self.experts if e.compute_device_type == "cpu"]
        other = [e for e in self.experts if e.compute_device_type != "cpu"]
        if not cpu or not other:
            return list(self.experts), []
        return other, cpu

    def _run_one(self, expert: Expert, frames: list[torch.Tensor], digests: list[str], stage) -> list[PerceptionResult]:
        """One expert on the batch, through the cache (frames seen before are not recomputed)."""
        with stage(f"expert.{expert.name}"):
            return predict_cached(expert, frames, self.cache, digests)


def predict_cached(
    expert: Expert, frames: Sequence[torch.Tensor], cache: ExpertCache, digests: Optional[Sequence[str]] = None
) -> list[PerceptionResult]:
    """``expert.predict(frames)``, answering the frames ``cache`` has seen before from it.

    The expert runs at most once, on the frames that missed (in their order); identical frames inside one call
    are computed once even when the cache is off. ``digests`` may pass precomputed
    :func:`~moai_sdk.cache.image_digest` values. Errors of the expert propagate and nothing is stored for that call.
    """
    frames = list(frames)
    if not frames:
        return []
    if digests is None:
        digests = [image_digest(f) for f in frames]
    elif len(digests) != len(frames):
        raise InputError(f"got {len(digests)} digests for {len(frames)} frames")
    expert_key = expert.cache_key()
    keys = [cache.make_key(expert_key, d) for d in digests]
    out: list[Optional[PerceptionResult]] = [cache.get(k) if cache.enabled else None for k in keys]
    todo: dict[tuple[str, str], list[int]] = {}
    for i, (key, res) in enumerate(zip(keys, out, strict=True)):
        if res is None:
            todo.setdefault(key, []).append(i)
    if todo:
        first = [positions[0] for positions in todo.values()]
        fresh = expert.predict([frames[i] for i in first])
        for (key, positions), result in zip(todo.items(), fresh, strict=True):
            cache.put(key, result)
            for i in positions:
                out[i] = result
        logger.debug("expert %s: %d of %d images computed", expert.name, len(first), len(frames))
    return [r for r in out if r is not None]


__all__ = [
    "Expert",
    "check_on_expert_error",
    "register_expert",
    "unregister_expert",
    "create_expert",
    "get_expert_class",
    "available_experts",
    "Perception",
    "predict_cached",
    "frame_result",
    "SCENE_GRAPH_MISSING_WARNING",
]
