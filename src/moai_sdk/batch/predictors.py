"""Callable classes for Ray Data's ``map_batches`` (and any batch loop): the perception stage and the LLM stage.

They hold one pipeline each, built once per actor from a picklable :class:`~moai_sdk.batch.core.PipelineSpec`,
and take/return batches as dicts of numpy arrays (Ray Data's ``"numpy"`` batch format). Nothing here imports
Ray, so users can put them in their own pipelines::

    import ray
    from moai_sdk.batch import MoAIPredictor, PerceptionPredictor, PipelineSpec

    spec = PipelineSpec(model="BK-Lee/MoAI-7B")
    ds = ray.data.read_json("questions.jsonl")                    # columns: image (path/URL), prompt, ...
    pool = ray.data.ActorPoolStrategy(size=2)
    ds = ds.map_batches(PerceptionPredictor, fn_constructor_kwargs={"pipeline": spec},
                        batch_size=8, compute=pool, num_gpus=1)   # adds "perception" (JSON) and "frame"
    ds = ds.map_batches(MoAIPredictor, fn_constructor_kwargs={"pipeline": spec, "perception_columns": ["perception"]},
                        batch_size=8, compute=pool, num_gpus=1)   # adds answer, verbalization, ...
    ds.write_parquet("answers/")

Columns read: ``image`` (a path, ``http(s)`` URL, ``data:`` URL or bytes), ``prompt``, optionally ``error`` (rows
already failed upstream pass through). Written: ``answer``, ``verbalization``, ``token_counts`` and ``timings``
(JSON text, so every stage's output is plain Arrow), ``error``; every other column is kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from ..engine import MoAIEngine
from ..imageops import MOAI_IMAGE_SIZE, official_resize
from ..results import PerceptionResult
from .core import PipelineSpec, answer, answer_on_engine, decode_all, dumps, perceive

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def _spec(pipeline: Union[PipelineSpec, dict[str, Any]]) -> PipelineSpec:
    return pipeline if isinstance(pipeline, PipelineSpec) else PipelineSpec(**pipeline)


def cell(value: Any) -> Any:
    """A numpy/Arrow cell as a plain Python value (``None`` for nulls and NaN)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _column(batch: Batch, name: str, n: int) -> list[Any]:
    values = batch.get(name)
    return [None] * n if values is None else [cell(v) for v in values]


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _size(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


class PerceptionPredictor:
    """The perception stage: decode each row's image and run the experts on it.

    Args:
        pipeline: a :class:`PipelineSpec` (or its fields as a dict); the actor builds the pipeline once.
        only: run only these experts (tasks or names); ``exclude``: run all but these. Default: every expert.
        column: the output column for the :class:`PerceptionResult` JSON (masks included, so the LLM stage
            rebuilds the panoptic map exactly).
        emit_frame: also write ``frame``, the image after the official resize (490 x 490 x 3 uint8), so the LLM
            stage need not decode the image again.
        allow_remote: fetch ``http(s)`` image URLs.
        image_column: where the image source is.
    """

    def __init__(
        self,
        pipeline: Union[PipelineSpec, dict[str, Any]],
        *,
        only: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        column: str = "perception",
        emit_frame: bool = True,
        allow_remote: bool = False,
        image_column: str = "image",
    ) -> None:
        self.pipe = _spec(pipeline).build()
        tasks = list(self.pipe.experts)
        chosen = [t for t in tasks if (only is None or t in only or self.pipe.experts[t].name in only)]
        if exclude:
            chosen = [t for t in chosen if t not in exclude and self.pipe.experts[t].name not in exclude]
        self.experts = chosen
        self.column = column
        self.emit_frame = emit_frame
        self.allow_remote = allow_remote
        self.image_column = image_column
        logger.info("perception stage ready with experts %s", self.experts or "none")

    def __call__(self, batch: Batch) -> Batch:
        n = _size(batch)
        upstream = _column(batch, "error", n)
        sources = _column(batch, self.image_column, n)
        decoded = decode_all(
            [s if e is None else None for s, e in zip(sources, upstream)], allow_remote=self.allow_remote
        )
        images = [img for img, _ in decoded]
        errors = [e if e is not None else err for e, (_, err) in zip(upstream, decoded)]
        if self.experts:
            outcomes = perceive(self.pipe, images, errors, self.experts)
        else:
            outcomes = [(None, e) for e in errors]
        out = dict(batch)
        out[self.column] = _objects([p.to_json(include_masks=True) if p is not None else None for p, _ in outcomes])
        out["error"] = _objects([e for _, e in outcomes])
        if self.emit_frame:
            blank = np.zeros((MOAI_IMAGE_SIZE, MOAI_IMAGE_SIZE, 3), dtype=np.uint8)
            frames = [
                official_resize(img, MOAI_IMAGE_SIZE).permute(1, 2, 0).numpy()
                if img is not None and err is None
                else blank
                for img, (_, err) in zip(images, outcomes)
            ]
            out["frame"] = np.stack(frames) if frames else np.zeros((0, MOAI_IMAGE_SIZE, MOAI_IMAGE_SIZE, 3), np.uint8)
        return out


class MoAIPredictor:
    """The LLM stage (or, without ``perception_columns``, the whole pipeline in one stage).

    Args:
        pipeline: a :class:`PipelineSpec` (or its fields as a dict); the actor builds the pipeline once.
        generation: generation keywords of the pipeline call (``max_new_tokens``, ``num_beams``, ...).
        perception_columns: columns holding :class:`PerceptionResult` JSON from perception stages (merged per
            row; the experts do not run here and are not loaded). ``None``: run the experts in this stage.
        save_perception: also write ``perception`` (the merged perception as JSON, masks left out).
        allow_remote: fetch ``http(s)`` image URLs.
        image_column: where the image source is (when there is no ``frame`` column).
        engine: answer on a :class:`~moai_sdk.engine.MoAIEngine` owned by the actor (default; greedy and
            sampling -- beam search uses batched pipeline calls), ``max_num_seqs`` rows decoding together.
    """

    #: Columns used between stages and dropped from this stage's output.
    INTERNAL = ("frame",)

    def __init__(
        self,
        pipeline: Union[PipelineSpec, dict[str, Any]],
        *,
        generation: Optional[dict[str, Any]] = None,
        perception_columns: Optional[Sequence[str]] = None,
        save_perception: bool = False,
        allow_remote: bool = False,
        image_column: str = "image",
        engine: bool = True,
        max_num_seqs: int = 8,
    ) -> None:
        spec = _spec(pipeline)
        self.perception_columns = list(perception_columns) if perception_columns is not None else None
        self.pipe = spec.build(experts=None) if self.perception_columns is not None else spec.build()
        self.pipe.load()
        self.generation = dict(generation or {})
        self.save_perception = save_perception
        self.allow_remote = allow_remote
        self.image_column = image_column
        self.engine: Optional[MoAIEngine] = None
        if engine and int(self.generation.get("num_beams") or 1) == 1:
            self.engine = MoAIEngine(self.pipe, max_num_seqs=max_num_seqs).start(wait=True)

    def _images(self, batch: Batch, n: int, errors: list[Optional[str]]) -> list[Optional[torch.Tensor]]:
        if "frame" in batch:
            return [torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) for f in batch["frame"]]
        sources = _column(batch, self.image_column, n)
        decoded = decode_all(
            [s if e is None else None for s, e in zip(sources, errors)], allow_remote=self.allow_remote
        )
        for i, (_, err) in enumerate(decoded):
            errors[i] = errors[i] or err
        return [img for img, _ in decoded]

    def _perceptions(
        self, batch: Batch, n: int, errors: list[Optional[str]]
    ) -> Optional[list[Optional[PerceptionResult]]]:
        if self.perception_columns is None:
            return None
        merged: list[Optional[PerceptionResult]] = [None] * n
        for name in self.perception_columns:
            for i, text in enumerate(_column(batch, name, n)):
                if text is None or errors[i] is not None:
                    continue
                try:
                    part = PerceptionResult.from_json(text)
                    merged[i] = part if merged[i] is None else merged[i].merge(part)
                except Exception as exc:  # a damaged perception is that row's error
                    errors[i] = f"{type(exc).__name__}: {exc}"
        # each stage repeats the pipeline-wide warnings (e.g. "no scene-graph expert"): keep each once
        return [
            p.model_copy(update={"warnings": list(dict.fromkeys(p.warnings))}) if p is not None else None
            for p in merged
        ]

    def __call__(self, batch: Batch) -> Batch:
        n = _size(batch)
        errors: list[Optional[str]] = _column(batch, "error", n)
        images = self._images(batch, n, errors)
        perceptions = self._perceptions(batch, n, errors)
        if perceptions is not None and all(p is None for p in perceptions):
            perceptions = None  # no experts upstream: the official empty verbalization
        prompts = _column(batch, "prompt", n)
        if self.engine is not None:  # the actor's engine: rows of mixed answer lengths keep its slots busy
            outcomes = answer_on_engine(self.engine, images, prompts, errors, self.generation, perceptions)
        else:
            outcomes = answer(self.pipe, images, prompts, errors, self.generation, perceptions)
        out = {k: v for k, v in batch.items() if k not in self.INTERNAL and k not in (self.perception_columns or ())}
        results = [r for r, _ in outcomes]
        for r, p in zip(results, perceptions or [None] * n):
            if r is not None and p is not None:  # the experts ran upstream: report their seconds too
                r.timings.update({f"expert.{name}": float(s) for name, s in p.timings.items()})
        out["answer"] = _objects([r.text if r is not None else None for r in results])
        out["verbalization"] = _objects([r.aux_text if r is not None else None for r in results])
        out["token_counts"] = _objects([dumps(dict(r.token_counts)) if r is not None else None for r in results])
        out["timings"] = _objects(
            [dumps({k: round(float(v), 6) for k, v in r.timings.items()}) if r is not None else None for r in results]
        )
        out["error"] = _objects([e for _, e in outcomes])
        if self.save_perception:
            out["perception"] = _objects(
                [r.perception.to_json() if r is not None and r.perception is not None else None for r in results]
            )
        return out


def loads(text: Any) -> Any:
    """Parse a JSON cell written by :class:`MoAIPredictor` (``None`` stays ``None``)."""
    text = cell(text)
    return None if text is None else json.loads(text)


__all__ = ["PerceptionPredictor", "MoAIPredictor", "loads", "cell"]
