"""Which experts a pipeline runs: the ``experts=`` specification, turned into one :class:`Expert` per task.

* :func:`resolve_experts` -- ``"default"``, ``None``, a list of names / instances, or a dict by task (or by expert
  name) -> ``{task: Expert}``. A task name (``"ocr"``, ``"segmentation"``, ``"detection"``, ``"scene_graph"``)
  wherever an expert is named means that task's default backend (:data:`DEFAULT_EXPERTS`).
* :func:`select_experts` -- the subset of configured experts one call asks for (``experts=`` of a call).
* :func:`resolve_cache` -- the ``cache=`` option (True / False / a size / an :class:`~moai_sdk.cache.ExpertCache`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from ..cache import DEFAULT_CACHE_SIZE, ExpertCache
from ..errors import ConfigError
from ..hub import HubOptions
from ..results import TASKS
from .base import Expert, create_expert, get_expert_class

#: The expert used for each task when ``experts="default"`` (the official MoAI set; OCR runs RapidOCR, the
#: offline PP-OCR engine, instead of PaddleOCR -- pass ``{"ocr": "paddleocr"}`` for the official engine).
DEFAULT_EXPERTS: dict[str, str] = {
    "segmentation": "mask2former",
    "detection": "owlv2",
    "scene_graph": "psgtr",
    "ocr": "rapidocr",
}

#: Ways to specify one expert in ``experts=``: a registered name or a task, an instance, or a dict with ``name``
#: (or ``backend``), optional ``model_id`` / ``revision`` / ``device`` and any backend settings.
ExpertSpec = Union[str, Expert, Mapping[str, Any], None]

_HUB_KEYWORDS = ("cache_dir", "token", "local_files_only")


def backend_name(name: str) -> str:
    """A registered expert name for ``name``: a task name means that task's default backend."""
    return DEFAULT_EXPERTS.get(name, name)


def _expert_from_spec(spec: ExpertSpec, common: Mapping[str, Any], where: str) -> Expert:
    """One expert from a name (or task), an instance or a dict with ``name``."""
    if isinstance(spec, Expert):
        return spec
    if isinstance(spec, str):
        return create_expert(backend_name(spec), **common)
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        backend = options.pop("backend", None)
        if name is not None and backend is not None and name != backend:
            raise ConfigError(f"{where}: give the expert as 'name' or 'backend', not both ({name!r} vs {backend!r})")
        name = name or backend
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: an expert given as a dict needs 'name' (a registered expert); got {spec!r}")
        return create_expert(backend_name(name), **{**common, **options})
    raise ConfigError(
        f"{where}: an expert is a registered name, an Expert instance or a dict with 'name'; got {type(spec).__name__}"
    )


def _from_mapping(spec: Mapping[Any, Any], common: Mapping[str, Any]) -> list[Expert]:
    built = []
    for key, value in spec.items():
        if value is None or value is False:
            continue
        where = f"experts[{key!r}]"
        if key in TASKS:
            exp = _expert_from_spec(value, common, where)
            if exp.task != key:
                raise ConfigError(f"{where} is {exp.name!r}, an expert for {exp.task!r}")
        elif isinstance(key, str):
            get_expert_class(key)  # ConfigError naming the registered experts
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where} must be a dict of options (or None); got {type(value).__name__}")
            exp = _expert_from_spec({"name": key, **value}, common, where)
        else:
            raise ConfigError(f"experts keys are tasks {list(TASKS)} or expert names; got {key!r}")
        built.append(exp)
    return built


def resolve_experts(
    spec: Any,
    *,
    hub: Optional[HubOptions] = None,
    device: Union[str, torch.device, None] = None,
    **common: Any,
) -> dict[str, Expert]:
    """Build the task -> expert mapping of a pipeline from ``spec``.

    ``spec`` may be:

    * ``"default"`` (or ``...``): :data:`DEFAULT_EXPERTS`;
    * ``None``, ``False`` or an empty list / dict: no experts (the model sees the empty verbalization);
    * a list of registered names, task names and/or :class:`~moai_sdk.experts.base.Expert` instances (one per task);
    * a dict keyed by task (``"segmentation"``, ``"detection"``, ``"scene_graph"``, ``"ocr"``) whose values are
      expert specs (name, instance, or dict with ``name`` plus ``model_id``, ``revision``, settings such as
      thresholds); ``None`` leaves a task out, and so does omitting it (to change one default expert write
      ``{**DEFAULT_EXPERTS, "ocr": "paddleocr"}``). A key may also be a registered expert *name* with a dict of
      options: ``{"owlv2": {"threshold": 0.2}}``.

    ``hub`` (cache folder, token, offline flag; the legacy ``cache_dir`` / ``token`` / ``local_files_only``
    keywords fold into it), ``device`` and any other ``common`` keyword are passed to every expert built here;
    options given per expert win. Raises :class:`ConfigError` for unknown names or two experts for one task.
    """
    legacy = {k: common.pop(k) for k in _HUB_KEYWORDS if k in common}
    if hub is not None or legacy:
        if not legacy.get("local_files_only"):
            legacy.pop("local_files_only", None)  # False must not switch off the hub's local_files_only
        common["hub"] = HubOptions.from_any(hub, **legacy)
    if device is not None:
        common["device"] = device
    if spec is ... or (isinstance(spec, str) and spec == "default"):
        spec = dict(DEFAULT_EXPERTS)
    if spec is None or spec is False:
        return {}
    if isinstance(spec, (str, Expert)):
        spec = [spec]
    if isinstance(spec, Mapping):
        built = _from_mapping(spec, common)
    elif isinstance(spec, (list, tuple)):
        built = [_expert_from_spec(item, common, f"experts[{i}]") for i, item in enumerate(spec)]
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


def select_experts(configured: Mapping[str, Expert], wanted: Any) -> list[Expert]:
    """The configured experts (task -> expert) one call asks for, in task order: ``None`` = all of them, else
    names or tasks of configured experts (``[]`` = none)."""
    if wanted is None:
        return list(configured.values())
    if isinstance(wanted, str):
        wanted = [wanted]
    if not isinstance(wanted, (list, tuple, set)):
        raise ConfigError(f"experts= for one call is a list of configured expert names or tasks; got {wanted!r}")
    by_name = {e.name: e for e in configured.values()}
    chosen: list[Expert] = []
    for item in wanted:
        exp = configured.get(item) or by_name.get(item)
        if exp is None:
            listed = [f"{t} ({e.name})" for t, e in configured.items()] or ["none"]
            raise ConfigError(
                f"expert {item!r} is not configured in this pipeline; configured: {', '.join(listed)}. "
                "Pass experts= to MoAIPipeline.from_pretrained to add it"
            )
        if exp not in chosen:
            chosen.append(exp)
    return sorted(chosen, key=lambda e: TASKS.index(e.task))


def resolve_cache(option: Union[bool, int, ExpertCache, None]) -> ExpertCache:
    """The expert cache for ``cache=``: ``True`` / ``None`` (default size), ``False`` (off), a size, or a given
    :class:`~moai_sdk.cache.ExpertCache` (shared as is)."""
    if isinstance(option, ExpertCache):
        return option
    if option is True or option is None:
        return ExpertCache(DEFAULT_CACHE_SIZE)
    if option is False:
        return ExpertCache(0)
    if isinstance(option, int):
        return ExpertCache(option)
    raise ConfigError(f"cache must be True, False, a size (int >= 0) or an ExpertCache; got {option!r}")


__all__ = [
    "DEFAULT_EXPERTS",
    "ExpertSpec",
    "backend_name",
    "resolve_experts",
    "select_experts",
    "resolve_cache",
]
