"""Answers from generated tokens: where an answer ends, and how to stream it while it is generated.

* :func:`cut_answer` (from the decoding core, :mod:`moai_sdk.modeling.decoding`) -- the official demo cuts the decoded answer at the first ``"[U"`` (:data:`ANSWER_CUT`, the
  start of the InternLM2 chat markers); a call's stop strings cut it too.
* :func:`stable_prefix` -- the part of a partial answer that later tokens cannot change.
* :class:`AnswerStream` -- one row of a batch being generated: feed it each new token id, get back the text that is
  now stable; at the end, :meth:`AnswerStream.finish` gives the rest of the final answer. The pieces concatenate
  to the final answer. Used by :meth:`MoAIPipeline.stream <moai_sdk.pipeline.MoAIPipeline.stream>` and by servers
  that stream several rows of one batch.
* :func:`stream_in_thread` -- run a generation in a worker thread and yield its pieces in the calling thread;
  closing the iterator stops the generation.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator, Protocol, Sequence, TypeVar, Union

import torch

from .modeling.decoding import ANSWER_CUT, cut_answer

logger = logging.getLogger(__name__)

#: ``on_token(ids)``: called after each generated step with the new token id of every row (a [B] tensor).
TokenCallback = Callable[[torch.Tensor], None]


def stable_prefix(answer: str, stop: Sequence[str] = ()) -> str:
    """The part of a partial ``answer`` (already :func:`cut_answer`) that later tokens cannot change: without a
    trailing incomplete character (``"\\ufffd"``) and without an ending that could still grow into
    :data:`ANSWER_CUT` or a stop string."""
    text = answer.rstrip("\ufffd")
    hold = 0
    for marker in (ANSWER_CUT, *stop):
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


class AnswerStream:
    """The streamed answer of one row: :meth:`push` each generated token id, get the newly stable text.

    ``decode(ids)`` turns the row's token ids into text (special tokens skipped, chat markers kept, as the final
    answer is decoded); ``stop`` are the call's stop strings. :meth:`finish` returns what remains of the final
    answer, so that the pieces concatenate to it.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""  # emitted so far
        self.finished = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that became stable ("" when none did)."""
        if self.finished:
            return ""
        self.tokens.append(int(token_id))
        safe = stable_prefix(cut_answer(self.decode(self.tokens), self.stop), self.stop)
        if len(safe) > len(self.text) and safe.startswith(self.text):
            piece, self.text = safe[len(self.text) :], safe
            return piece
        return ""

    def finish(self, final_text: str) -> str:
        """The rest of the final answer after what was emitted ("" when nothing is left)."""
        self.finished = True
        if not final_text.startswith(self.text):
            logger.warning("streamed text diverged from the final answer; trust the final answer")
            return ""
        piece, self.text = final_text[len(self.text) :], final_text
        return piece


class _HasText(Protocol):
    text: str


R = TypeVar("R", bound=_HasText)


class _Cancelled(Exception):
    """Raised inside the generation thread when the consumer stops iterating."""


class _Events:
    """What the worker thread hands to the consumer: tokens, then the result, an error or a cancellation."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.cancel = threading.Event()

    def on_token(self, ids: torch.Tensor) -> None:
        if self.cancel.is_set():
            raise _Cancelled()
        self.queue.put(("token", int(ids[0])))


def stream_in_thread(run: Callable[..., R], answer: AnswerStream) -> Iterator[Union[str, R]]:
    """Run ``run(on_token=callback)`` in a worker thread; yield the stable text pieces of row 0 as its tokens arrive, then
    the rest of the final answer and the result ``run`` returned.

    An exception in ``run`` is raised here. Closing the iterator early makes the next ``on_token`` call raise in
    the worker, which ends the generation, and waits for the worker to finish.
    """
    events = _Events()

    def work() -> None:
        try:
            events.queue.put(("done", run(on_token=events.on_token)))
        except _Cancelled:
            events.queue.put(("cancelled", None))
        except BaseException as exc:  # handed to the consumer thread, which raises it
            events.queue.put(("error", exc))

    worker = threading.Thread(target=work, name="moai-stream", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.queue.get()
            if kind == "token":
                piece = answer.push(payload)
                if piece:
                    yield piece
            elif kind == "done":
                rest = answer.finish(payload.text)
                if rest:
                    yield rest
                yield payload
                return
            elif kind == "error":
                raise payload
            else:
                return
    finally:
        events.cancel.set()
        worker.join()


__all__ = ["ANSWER_CUT", "TokenCallback", "cut_answer", "stable_prefix", "AnswerStream", "stream_in_thread"]
