"""The local runner of ``moai batch``: one pipeline in this process, batched, with a progress bar.

Rows are taken in input order and run on the continuous-batching engine (:mod:`moai_sdk.engine`) with
``batch_size`` rows decoding together, so a short answer frees its slot for the next row at once (each row equals
its single run: greedy answers do not depend on the batch size); beam search and ``scheduling="static"`` run
consecutive batches of ``batch_size`` rows, each one left-padded pipeline call. Every completed batch is appended
to the output's journal in input order (see :mod:`moai_sdk.batch.output`), so a killed run loses at most
the rows in flight and ``resume=True`` picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Optional

from tqdm.auto import tqdm

from ..engine import MoAIEngine
from ..pipeline import MoAIPipeline
from .core import SETUP_ERRORS, answer, decode_all, describe_error, result_row
from .inputs import BatchItem
from .output import OutputWriter

logger = logging.getLogger(__name__)


def batched(items: Iterable[BatchItem], size: int) -> Iterator[list[BatchItem]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def run_batch(
    pipe: MoAIPipeline,
    items: list[BatchItem],
    generation: dict[str, Any],
    *,
    save_perception: bool = False,
    allow_remote: bool = False,
) -> list[dict[str, Any]]:
    """The output rows of one batch (decode, answer, rows) -- unreadable images and failing rows become errors."""
    decoded = decode_all([it.image for it in items], allow_remote=allow_remote)
    images = [img for img, _ in decoded]
    errors = [err for _, err in decoded]
    outcomes = answer(pipe, images, [it.prompt for it in items], errors, generation)
    return [
        result_row(it.id, it.prompt, result, error, extra=it.extra, save_perception=save_perception)
        for it, (result, error) in zip(items, outcomes)
    ]


def run_local(
    pipe: MoAIPipeline,
    items: Iterable[BatchItem],
    writer: OutputWriter,
    generation: dict[str, Any],
    *,
    batch_size: int = 8,
    total: Optional[int] = None,
    save_perception: bool = False,
    allow_remote: bool = False,
    progress: bool = True,
    scheduling: str = "continuous",
) -> dict[str, Any]:
    """Answer ``items`` not yet in ``writer.done_ids`` and append each batch to ``writer``.

    ``scheduling="continuous"`` (default; greedy and sampling): the rows run on :class:`~moai_sdk.engine.MoAIEngine`
    with ``batch_size`` rows decoding together -- a row that finishes early frees its slot for the next row at
    once -- and completed rows are appended in input order, ``batch_size`` at a time. ``"static"`` (and beam
    search): consecutive batches of ``batch_size`` rows, one pipeline call each.

    Returns counts: ``rows`` written now, ``errors`` among them, ``skipped`` (already written), ``seconds``.
    The caller finalizes the writer (also after an interruption).
    """
    done = writer.done_ids
    skipped = 0

    def todo() -> Iterator[BatchItem]:
        nonlocal skipped
        for item in items:
            if item.id in done:
                skipped += 1
                continue
            yield item

    remaining = None if total is None else max(0, total - len(done))
    errors = rows = 0
    t0 = time.perf_counter()
    engine = scheduling == "continuous" and int(generation.get("num_beams") or 1) == 1
    with tqdm(total=remaining, unit="item", desc="moai batch", disable=not progress, dynamic_ncols=True) as bar:
        if engine:  # rows stream through the continuous-batching engine; chunks are written in input order
            for out in _engine_chunks(pipe, todo(), generation, batch_size, save_perception, allow_remote):
                writer.append(out)
                rows += len(out)
                errors += sum(r["error"] is not None for r in out)
                bar.update(len(out))
                if errors:
                    bar.set_postfix(errors=errors)
            return {"rows": rows, "errors": errors, "skipped": skipped, "seconds": time.perf_counter() - t0}
        for chunk in batched(todo(), batch_size):
            out = run_batch(pipe, chunk, generation, save_perception=save_perception, allow_remote=allow_remote)
            writer.append(out)
            rows += len(out)
            errors += sum(r["error"] is not None for r in out)
            bar.update(len(out))
            if errors:
                bar.set_postfix(errors=errors)
    return {"rows": rows, "errors": errors, "skipped": skipped, "seconds": time.perf_counter() - t0}


def _engine_chunks(
    pipe: MoAIPipeline,
    items: Iterable[BatchItem],
    generation: dict[str, Any],
    batch_size: int,
    save_perception: bool,
    allow_remote: bool,
) -> Iterator[list[dict[str, Any]]]:
    """Output rows in input order, ``batch_size`` at a time, from an engine kept fed with up to ``2 * batch_size``
    rows in flight (perception of the next rows overlaps the decoding of the running ones)."""
    window: deque[tuple[BatchItem, Any, Optional[str]]] = deque()

    def row(entry: tuple[BatchItem, Any, Optional[str]]) -> dict[str, Any]:
        item, handle, error = entry
        result = None
        if handle is not None:
            try:
                result = handle.result()
            except SETUP_ERRORS:
                raise
            except Exception as exc:  # that row's error cell
                logger.warning("row failed: %s", describe_error(exc))
                error = describe_error(exc)
        return result_row(item.id, item.prompt, result, error, extra=item.extra, save_perception=save_perception)

    with MoAIEngine(pipe, max_num_seqs=batch_size) as engine:
        for item in items:
            image, error = decode_all([item.image], allow_remote=allow_remote)[0]
            handle = None
            if error is None:
                try:
                    handle = engine.submit(image, item.prompt, **generation)
                except SETUP_ERRORS:
                    raise
                except Exception as exc:
                    error = describe_error(exc)
            window.append((item, handle, error))
            if len(window) >= 2 * batch_size:
                yield [row(window.popleft()) for _ in range(batch_size)]
        while window:
            yield [row(window.popleft()) for _ in range(min(batch_size, len(window)))]


__all__ = ["run_local", "run_batch", "batched"]
