"""The per-batch work both runners share: build the pipeline, decode images, run it, turn results into rows.

The local runner and the Ray stages call the same functions, which is why they write the same rows. A row whose
image cannot be read, or whose question fails, gets an ``error`` and the others go on: a batch that fails as a
whole is retried row by row so only the bad rows carry the error. Errors of the set-up (a bad configuration, a
missing checkpoint or dependency) are not row errors: they stop the run.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DependencyError, InputError
from ..imageops import load_image_chw
from ..pipeline import DEFAULT_MODEL_ID, MoAIPipeline
from ..results import MoAIResult, PerceptionResult
from ..testing import tiny_pipeline

logger = logging.getLogger(__name__)

#: Errors of the set-up rather than of one row: they stop a batch run instead of becoming an ``error`` cell.
SETUP_ERRORS = (ConfigError, CheckpointError, DependencyError)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class PipelineSpec:
    """How to build a :class:`~moai_sdk.pipeline.MoAIPipeline` -- picklable, so each Ray actor builds its own.

    ``model``: a Hub id or local folder (default ``BK-Lee/MoAI-7B``); ``tiny``: build
    :func:`moai_sdk.testing.tiny_pipeline` in this folder instead (offline, random answers); ``options``: keyword
    options of :meth:`MoAIPipeline.from_pretrained` (``device``, ``quantization``, ``experts``, ``template``...).
    """

    model: Optional[str] = None
    tiny: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, **overrides: Any) -> MoAIPipeline:
        """A new pipeline; ``overrides`` replace entries of :attr:`options` (e.g. ``experts=None``)."""
        options = {**self.options, **overrides}
        if self.tiny:
            return tiny_pipeline(self.tiny, **options)
        return MoAIPipeline.from_pretrained(self.model or DEFAULT_MODEL_ID, **options)


def describe_error(exc: BaseException) -> str:
    """The ``error`` cell of a failed row: the exception type and its message on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def decode_data_url(text: str) -> bytes:
    """The bytes of a ``data:...;base64,...`` URL (:class:`InputError` when it is not one)."""
    head, sep, payload = text.partition(",")
    if not sep or not head.lower().startswith("data:") or ";base64" not in head.lower():
        raise InputError(f"{text[:40]!r}... is not a base64 data URL")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"the data URL's base64 payload is invalid: {exc}") from exc


def encode_png_data_url(rgb: np.ndarray) -> str:
    """An RGB uint8 array as a lossless PNG ``data:`` URL (how video frames travel through Ray as text)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def load_source(source: Any, *, allow_remote: bool = False) -> torch.Tensor:
    """Decode one image source (a path, an ``http(s)`` URL, a ``data:`` URL, bytes or an array) to uint8 CHW."""
    if isinstance(source, np.ndarray) and source.dtype.kind in "OUS" and source.ndim == 0:
        source = source.item()
    if isinstance(source, str):
        low = source[:8].lower()
        if low.startswith("data:"):
            return load_image_chw(decode_data_url(source))
        if low.startswith(("http://", "https://")) and not allow_remote:
            raise InputError(
                f"{source[:80]!r} is a URL and fetching remote images is off: pass --allow-remote-images "
                "(moai batch) or allow_remote=True (moai_sdk.batch.run) to fetch it"
            )
        if not source:
            raise InputError("the row has no image")
    return load_image_chw(source, allow_remote=allow_remote)


def run_isolated(fn: Callable[[list[T]], Sequence[R]], rows: list[T]) -> list[tuple[Optional[R], Optional[str]]]:
    """``fn`` on all ``rows`` at once; if that raises, ``fn`` on each row alone, so that only the rows that fail
    on their own get an error. Returns ``(value, None)`` or ``(None, error)`` per row. Set-up errors propagate."""
    if not rows:
        return []
    try:
        values = fn(rows)
        return [(v, None) for v in values]
    except SETUP_ERRORS:
        raise
    except Exception as exc:  # one bad row must not cost the whole batch: isolate it below
        if len(rows) == 1:
            logger.warning("row failed: %s", describe_error(exc))
            return [(None, describe_error(exc))]
        logger.warning("a batch of %d failed (%s); retrying its rows one by one", len(rows), describe_error(exc))
    out: list[tuple[Optional[R], Optional[str]]] = []
    for row in rows:
        try:
            out.append((fn([row])[0], None))
        except SETUP_ERRORS:
            raise
        except Exception as exc:  # recorded in the row's error cell
            logger.warning("row failed: %s", describe_error(exc))
            out.append((None, describe_error(exc)))
    return out


def decode_all(
    sources: Sequence[Any], *, allow_remote: bool = False
) -> list[tuple[Optional[torch.Tensor], Optional[str]]]:
    """:func:`load_source` per row: ``(image, None)`` or ``(None, error)``."""
    out: list[tuple[Optional[torch.Tensor], Optional[str]]] = []
    for source in sources:
        try:
            out.append((load_source(source, allow_remote=allow_remote), None))
        except SETUP_ERRORS:
            raise
        except Exception as exc:  # an unreadable image is that row's error
            out.append((None, describe_error(exc)))
    return out


def run_error_free(
    fn: Callable[[list[int]], Sequence[R]], errors: Sequence[Optional[str]]
) -> list[tuple[Optional[R], Optional[str]]]:
    """:func:`run_isolated` on the indices of the rows without an error; the other rows keep their error."""
    todo = [i for i, e in enumerate(errors) if e is None]
    out: list[tuple[Optional[R], Optional[str]]] = [(None, e) for e in errors]
    for i, outcome in zip(todo, run_isolated(fn, todo)):
        out[i] = outcome
    return out


def answer(
    pipe: MoAIPipeline,
    images: Sequence[Optional[torch.Tensor]],
    prompts: Sequence[str],
    errors: Sequence[Optional[str]],
    generation: dict[str, Any],
    perceptions: Optional[Sequence[Optional[PerceptionResult]]] = None,
) -> list[tuple[Optional[MoAIResult], Optional[str]]]:
    """Answer every row without an error as one batched pipeline call (rows that fail alone get an error).

    ``perceptions``: precomputed perception per row (the experts then do not run), or ``None``.
    """

    def call(idx: list[int]) -> list[MoAIResult]:
        kwargs = dict(generation)
        if perceptions is not None:
            kwargs["perception"] = [perceptions[i] for i in idx]
        return pipe([images[i] for i in idx], [prompts[i] for i in idx], **kwargs)

    return run_error_free(call, errors)


def answer_on_engine(
    engine: Any,
    images: Sequence[Optional[torch.Tensor]],
    prompts: Sequence[str],
    errors: Sequence[Optional[str]],
    generation: dict[str, Any],
    perceptions: Optional[Sequence[Optional[PerceptionResult]]] = None,
) -> list[tuple[Optional[MoAIResult], Optional[str]]]:
    """:func:`answer` on a running :class:`~moai_sdk.engine.MoAIEngine`: every row without an error is submitted
    at once (rows that end early free their slots for the others) and fails on its own."""
    handles: list[Any] = []
    out: list[tuple[Optional[MoAIResult], Optional[str]]] = [(None, e) for e in errors]
    for i, error in enumerate(errors):
        if error is not None:
            handles.append(None)
            continue
        kwargs = dict(generation)
        if perceptions is not None:
            kwargs["perception"] = perceptions[i]
        try:
            handles.append(engine.submit(images[i], prompts[i], **kwargs))
        except SETUP_ERRORS:
            raise
        except Exception as exc:
            handles.append(None)
            out[i] = (None, describe_error(exc))
    for i, handle in enumerate(handles):
        if handle is None:
            continue
        try:
            out[i] = (handle.result(), None)
        except SETUP_ERRORS:
            raise
        except Exception as exc:  # recorded in the row's error cell
            logger.warning("row failed: %s", describe_error(exc))
            out[i] = (None, describe_error(exc))
    return out


def perceive(
    pipe: MoAIPipeline,
    images: Sequence[Optional[torch.Tensor]],
    errors: Sequence[Optional[str]],
    experts: Optional[Sequence[str]] = None,
) -> list[tuple[Optional[PerceptionResult], Optional[str]]]:
    """Run the experts (all configured ones, or the ``experts`` subset) on every row without an error."""

    def call(idx: list[int]) -> list[PerceptionResult]:
        return pipe.perceive([images[i] for i in idx], experts=list(experts) if experts is not None else None)

    return run_error_free(call, errors)


def result_row(
    item_id: str,
    prompt: str,
    result: Optional[MoAIResult],
    error: Optional[str],
    *,
    extra: Optional[dict[str, Any]] = None,
    save_perception: bool = False,
    perception: Optional[PerceptionResult] = None,
) -> dict[str, Any]:
    """The output row: ``id, prompt, answer, verbalization, token_counts, timings, error``, then the carried
    columns, then ``perception`` (JSON text, masks left out) with ``save_perception``.

    ``timings`` are the seconds of the batch the row ran in (a batch runs as one call); ``perception`` defaults
    to the result's.
    """
    row: dict[str, Any] = {
        "id": item_id,
        "prompt": prompt,
        "answer": result.text if result is not None else None,
        "verbalization": result.aux_text if result is not None else None,
        "token_counts": dict(result.token_counts) if result is not None else None,
        "timings": {k: round(float(v), 6) for k, v in result.timings.items()} if result is not None else None,
        "error": error,
    }
    if extra:
        row.update(extra)
    if save_perception:
        p = perception if perception is not None else (result.perception if result is not None else None)
        row["perception"] = p.to_json() if p is not None else None
    return row


def dumps(value: Any) -> Optional[str]:
    """JSON text of a dict cell (``None`` stays ``None``) -- how dict columns cross Ray stages."""
    return None if value is None else json.dumps(value)


__all__ = [
    "PipelineSpec",
    "SETUP_ERRORS",
    "describe_error",
    "decode_data_url",
    "encode_png_data_url",
    "load_source",
    "run_isolated",
    "run_error_free",
    "decode_all",
    "answer",
    "perceive",
    "result_row",
    "dumps",
]
