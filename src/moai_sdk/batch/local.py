"""The local runner of ``moai batch``: one pipeline in this process, batched, with a progress bar.

Rows are taken in input order, ``batch_size`` at a time; each batch is one left-padded pipeline call (each row
equals its single run), so greedy answers do not depend on the batch size. Every completed batch is appended
to the output's journal before the next starts (see :mod:`moai_sdk.batch.output`), so a killed run loses at most
the batch in flight and ``resume=True`` picks up where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, Optional

from tqdm.auto import tqdm

from ..pipeline import MoAIPipeline
from .core import answer, decode_all, result_row
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
) -> dict[str, Any]:
    """Answer ``items`` not yet in ``writer.done_ids`` and append each batch to ``writer``.

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
    with tqdm(total=remaining, unit="item", desc="moai batch", disable=not progress, dynamic_ncols=True) as bar:
        for chunk in batched(todo(), batch_size):
            out = run_batch(pipe, chunk, generation, save_perception=save_perception, allow_remote=allow_remote)
            writer.append(out)
            rows += len(out)
            errors += sum(r["error"] is not None for r in out)
            bar.update(len(out))
            if errors:
                bar.set_postfix(errors=errors)
    return {"rows": rows, "errors": errors, "skipped": skipped, "seconds": time.perf_counter() - t0}


__all__ = ["run_local", "run_batch", "batched"]
