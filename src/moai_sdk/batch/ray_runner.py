"""The Ray runner of ``moai batch``: a Ray Data pipeline read -> perception -> LLM -> write.

Stages (each a ``map_batches`` over an actor pool that builds its pipeline once):

1. **perception** (:class:`~moai_sdk.batch.predictors.PerceptionPredictor`): decodes each image, runs the experts,
   and passes on the perception as JSON plus the 490 x 490 frame. With GPUs (``num_gpus_per_actor > 0``) it runs
   the GPU experts on GPU actors, and the CPU experts (``cpu_experts``, by default OCR) run in a second stage on
   CPU-only actors, so OCR scales with the cluster's CPUs instead of holding a GPU.
2. **LLM** (:class:`~moai_sdk.batch.predictors.MoAIPredictor`, on a continuous-batching engine per actor): merges
   the perceptions and answers each batch
   with ``perception=`` given, so the experts are not loaded there.

The driver streams the results (Ray Data runs the stages concurrently and keeps the input order) into the same
journal and output file as the local runner, with the same columns; for greedy decoding the answers equal the
local runner's. Failed actors are restarted and their batches retried by Ray (``max_restarts``,
``max_task_retries``), and a row is written once, when its batch comes back, so a lost actor neither loses nor
duplicates rows.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, import_optional
from .core import PipelineSpec, encode_png_data_url
from .inputs import BatchItem
from .output import OutputWriter
from .predictors import MoAIPredictor, PerceptionPredictor, cell, loads

logger = logging.getLogger(__name__)

#: Actor restarts and task retries granted to each stage (a crashed actor is rebuilt and its batch rerun).
DEFAULT_MAX_RESTARTS = 4


def import_ray() -> Any:
    """``ray`` (with Ray Data), or a :class:`DependencyError` saying how to install it."""
    import_optional("ray.data", "the Ray runner needs Ray Data: pip install 'moai-sdk[ray]'")  # the ray[data] extra
    return import_optional("ray", "the Ray runner needs Ray: pip install 'moai-sdk[ray]'")


def _image_text(image: Any) -> str:
    """An image source as text for Ray rows: paths and URLs as they are, bytes and arrays as ``data:`` URLs."""
    if isinstance(image, str):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        import base64

        return "data:application/octet-stream;base64," + base64.b64encode(bytes(image)).decode("ascii")
    if isinstance(image, np.ndarray):
        return encode_png_data_url(image)
    raise ConfigError(f"cannot send an image of type {type(image).__name__} to Ray; use a path, URL, bytes or array")


def _map_batches(ds: Any, fn: Any, **options: Any) -> Any:
    """``ds.map_batches`` without Ray's deprecation warning for ``max_restarts`` / ``max_task_retries``: a bounded
    restart count has no named parameter yet (Ray 2.60), and Ray's own default restarts a crashing actor forever."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **options)


def build_dataset(
    ds: Any,
    pipeline: PipelineSpec,
    *,
    generation: Optional[dict[str, Any]] = None,
    batch_size: int = 8,
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    cpu_experts: Optional[Sequence[str]] = None,
    save_perception: bool = False,
    allow_remote: bool = False,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> Any:
    """Add the perception and LLM stages to a Ray dataset with ``image`` and ``prompt`` columns.

    ``cpu_experts``: experts (tasks or names) run in a separate CPU-only stage; default ``["ocr"]`` when the
    model stages have GPUs, none otherwise. Returns the dataset (lazy); write it with ``write_parquet`` or
    iterate it with ``iter_batches``.
    """
    ray = import_ray()
    if cpu_experts is None:
        cpu_experts = ["ocr"] if num_gpus_per_actor > 0 else []
    common: dict[str, Any] = dict(
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
    )
    model_stage = dict(common, num_cpus=num_cpus_per_actor)
    if num_gpus_per_actor > 0:
        model_stage["num_gpus"] = num_gpus_per_actor
    ds = _map_batches(
        ds,
        PerceptionPredictor,
        fn_constructor_kwargs=dict(pipeline=pipeline, exclude=list(cpu_experts), allow_remote=allow_remote),
        **model_stage,
    )
    columns = ["perception"]
    if cpu_experts:
        ds = _map_batches(
            ds,
            PerceptionPredictor,
            fn_constructor_kwargs=dict(
                pipeline=pipeline,
                only=list(cpu_experts),
                column="perception_cpu",
                emit_frame=False,
                allow_remote=allow_remote,
            ),
            **dict(common, num_cpus=num_cpus_per_actor),
        )
        columns.append("perception_cpu")
    return _map_batches(
        ds,
        MoAIPredictor,
        fn_constructor_kwargs=dict(
            pipeline=pipeline,
            generation=dict(generation or {}),
            perception_columns=columns,
            save_perception=save_perception,
            allow_remote=allow_remote,
            max_num_seqs=batch_size,
        ),
        **model_stage,
    )


def _rows(batch: dict[str, Any], extras: dict[str, dict[str, Any]], save_perception: bool) -> list[dict[str, Any]]:
    """The output rows of a result batch, in the local runner's column order."""
    out = []
    for i in range(len(batch["id"])):
        item_id = str(batch["id"][i])
        row: dict[str, Any] = {
            "id": item_id,
            "prompt": str(batch["prompt"][i]),
            "answer": loads_text(batch["answer"][i]),
            "verbalization": loads_text(batch["verbalization"][i]),
            "token_counts": loads(batch["token_counts"][i]),
            "timings": loads(batch["timings"][i]),
            "error": loads_text(batch["error"][i]),
        }
        row.update(extras.get(item_id, {}))
        if save_perception:
            row["perception"] = loads_text(batch["perception"][i])
        out.append(row)
    return out


def loads_text(value: Any) -> Optional[str]:
    """A text cell as ``str`` or ``None`` (Ray hands an all-null column over as NaN floats)."""
    value = cell(value)
    return None if value is None else str(value)


def run_ray(
    pipeline: PipelineSpec,
    items: Iterable[BatchItem],
    writer: OutputWriter,
    generation: dict[str, Any],
    *,
    batch_size: int = 8,
    save_perception: bool = False,
    allow_remote: bool = False,
    progress: bool = True,
    address: Optional[str] = None,
    concurrency: int = 1,
    num_gpus_per_actor: Optional[float] = None,
    num_cpus_per_actor: float = 1.0,
    cpu_experts: Optional[Sequence[str]] = None,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
) -> dict[str, Any]:
    """Answer ``items`` not yet in ``writer.done_ids`` on Ray and append each result batch to ``writer``.

    Connects to ``address`` (``"auto"`` or ``"ray://host:10001"``) or, without one, uses the Ray already
    initialised in this process or starts a local one (and shuts it down at the end).
    ``num_gpus_per_actor=None``: 1 when the cluster has GPUs, else 0. Returns the same counts as the local runner
    plus ``startup_seconds`` (connecting or starting Ray).
    """
    ray = import_ray()
    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=logger.isEnabledFor(logging.INFO))
        started = True
    startup = time.perf_counter() - t0
    try:
        if num_gpus_per_actor is None:
            num_gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        done = writer.done_ids
        rows: list[dict[str, Any]] = []
        extras: dict[str, dict[str, Any]] = {}
        skipped = 0
        for item in items:
            if item.id in done:
                skipped += 1
                continue
            rows.append({"id": item.id, "prompt": item.prompt, "image": _image_text(item.image)})
            extras[item.id] = item.extra
        result = {"rows": 0, "errors": 0, "skipped": skipped, "startup_seconds": startup}
        if not rows:
            result["seconds"] = 0.0
            return result
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # output in input order, like the local runner
        context.enable_progress_bars = progress
        ds = build_dataset(
            ray.data.from_items(rows),
            pipeline,
            generation=generation,
            batch_size=batch_size,
            concurrency=concurrency,
            num_gpus_per_actor=num_gpus_per_actor,
            num_cpus_per_actor=num_cpus_per_actor,
            cpu_experts=cpu_experts,
            save_perception=save_perception,
            allow_remote=allow_remote,
            max_restarts=max_restarts,
        )
        t1 = time.perf_counter()
        with tqdm(
            total=len(rows), unit="item", desc="moai batch (ray)", disable=not progress, dynamic_ncols=True
        ) as bar:
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                out = _rows(batch, extras, save_perception)
                writer.append(out)
                result["rows"] += len(out)
                result["errors"] += sum(r["error"] is not None for r in out)
                bar.update(len(out))
        result["seconds"] = time.perf_counter() - t1
        return result
    finally:
        if started:
            ray.shutdown()


__all__ = ["run_ray", "build_dataset", "import_ray", "DEFAULT_MAX_RESTARTS"]
