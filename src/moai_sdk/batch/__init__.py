"""Datasets through MoAI: ``moai batch`` and :func:`run`, locally or on a Ray cluster, resumable.

::

    from moai_sdk.batch import run

    summary = run("pope.jsonl", "answers.jsonl", model="BK-Lee/MoAI-7B", generation={"max_new_tokens": 16})
    summary = run("photos/", "captions.parquet", prompt="Describe the image.", ray=True, concurrency=4)

Modules: :mod:`~moai_sdk.batch.inputs` (folders, manifests, video), :mod:`~moai_sdk.batch.output` (journal,
atomic output, resume), :mod:`~moai_sdk.batch.local` and :mod:`~moai_sdk.batch.ray_runner` (the runners),
:mod:`~moai_sdk.batch.predictors` (Ray Data stages usable in your own ``map_batches``),
:mod:`~moai_sdk.batch.scoring` (POPE, multiple choice, exact match).

The names below load on first use (module ``__getattr__``), so ``moai_sdk.batch.cli`` -- the ``moai batch``
arguments -- imports without torch; :func:`run` imports the pipeline when it runs.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ..pipeline import MoAIPipeline
    from .core import PipelineSpec
    from .inputs import BatchInputs, BatchItem, read_inputs
    from .output import OutputWriter, read_rows
    from .predictors import MoAIPredictor, PerceptionPredictor
    from .scoring import score, score_file

logger = logging.getLogger(__name__)

_LAZY = {
    "read_inputs": "inputs",
    "BatchItem": "inputs",
    "BatchInputs": "inputs",
    "OutputWriter": "output",
    "read_rows": "output",
    "PipelineSpec": "core",
    "MoAIPredictor": "predictors",
    "PerceptionPredictor": "predictors",
    "score": "scoring",
    "score_file": "scoring",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def run(
    inputs: Union[str, Path],
    output: Union[str, Path],
    *,
    prompt: Optional[str] = None,
    every: Optional[float] = None,
    pipeline: Optional[MoAIPipeline] = None,
    model: Optional[str] = None,
    tiny: Optional[Union[str, Path]] = None,
    pipeline_options: Optional[dict[str, Any]] = None,
    generation: Optional[dict[str, Any]] = None,
    batch_size: int = 8,
    resume: bool = False,
    overwrite: bool = False,
    save_perception: bool = False,
    allow_remote: bool = False,
    progress: bool = True,
    ray: bool = False,
    ray_address: Optional[str] = None,
    concurrency: int = 1,
    num_gpus_per_actor: Optional[float] = None,
    num_cpus_per_actor: float = 1.0,
    cpu_experts: Optional[Sequence[str]] = None,
    columns: Optional[dict[str, str]] = None,
    scheduling: str = "continuous",
) -> dict[str, Any]:
    """Answer every row of ``inputs`` and write ``output`` (JSONL or Parquet by suffix); returns a summary.

    Inputs and outputs are described in :func:`~moai_sdk.batch.inputs.read_inputs` and
    :mod:`~moai_sdk.batch.output`. The pipeline is ``pipeline`` (local runner only), or built from ``model`` /
    ``tiny`` and ``pipeline_options`` (keywords of :meth:`MoAIPipeline.from_pretrained`); ``generation`` holds
    the pipeline call's generation keywords (greedy by default). ``resume`` skips ids already written;
    ``overwrite`` replaces an earlier output. ``ray=True`` runs the Ray Data pipeline (``ray_address``,
    ``concurrency`` actors per stage, ``num_gpus_per_actor``, ``num_cpus_per_actor``, ``cpu_experts``).
    ``columns`` renames manifest columns: ``{"id": ..., "image": ..., "prompt": ...}``.

    The summary: ``output``, ``rows`` written by this run, ``errors`` among them, ``skipped`` (already written),
    ``total`` rows in the output, ``seconds``, ``items_per_second`` and, with Ray, ``startup_seconds``.
    """
    from ..modeling import GenerationSettings
    from .core import PipelineSpec
    from .inputs import read_inputs
    from .local import run_local
    from .output import OutputWriter

    if scheduling not in ("continuous", "static"):
        raise InputError(f"scheduling must be 'continuous' or 'static'; got {scheduling!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    if resume and overwrite:
        raise InputError("resume and overwrite exclude each other: resume continues the output, overwrite replaces it")
    names = {"id_column": "id", "image_column": "image", "prompt_column": "prompt"}
    for key, value in (columns or {}).items():
        if f"{key}_column" not in names:
            raise InputError(f"columns= renames 'id', 'image' or 'prompt'; got {key!r}")
        names[f"{key}_column"] = value
    source = read_inputs(inputs, prompt=prompt, every=every, **names)
    writer = OutputWriter(output, resume=resume, overwrite=overwrite)
    generation = dict(generation or {})
    spec = PipelineSpec(model=model, tiny=str(tiny) if tiny is not None else None, options=dict(pipeline_options or {}))
    complete = False
    try:
        if ray:
            if pipeline is not None:
                raise InputError("the Ray runner builds a pipeline per actor: pass model=/tiny= and pipeline_options=")
            GenerationSettings.from_any(None, **generation)  # refuse bad options before starting Ray
            from .ray_runner import run_ray

            stats = run_ray(
                spec,
                source,
                writer,
                generation,
                batch_size=batch_size,
                save_perception=save_perception,
                allow_remote=allow_remote,
                progress=progress,
                address=ray_address,
                concurrency=concurrency,
                num_gpus_per_actor=num_gpus_per_actor,
                num_cpus_per_actor=num_cpus_per_actor,
                cpu_experts=cpu_experts,
            )
        else:
            pipe = pipeline if pipeline is not None else spec.build()
            GenerationSettings.from_any(pipe.generation_config, **generation)  # bad options fail before any row
            stats = run_local(
                pipe,
                source,
                writer,
                generation,
                batch_size=batch_size,
                total=source.total,
                save_perception=save_perception,
                allow_remote=allow_remote,
                progress=progress,
                scheduling=scheduling,
            )
        complete = True
    finally:
        path = writer.finalize(complete)  # also after Ctrl-C: the rows done so far become a complete output
    stats["output"] = str(path)
    stats["total"] = len(writer.done_ids)
    stats["items_per_second"] = stats["rows"] / stats["seconds"] if stats.get("seconds") else 0.0
    logger.info(
        "moai batch: %d rows (%d errors) in %.1fs -> %s", stats["rows"], stats["errors"], stats["seconds"], path
    )
    return stats


__all__ = [
    "run",
    "read_inputs",
    "BatchItem",
    "BatchInputs",
    "OutputWriter",
    "read_rows",
    "PipelineSpec",
    "MoAIPredictor",
    "PerceptionPredictor",
    "score",
    "score_file",
]
