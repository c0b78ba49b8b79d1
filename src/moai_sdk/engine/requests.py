"""Requests of the engine: what a caller submits, the state each one goes through, and the handle it gets back.

* :class:`EngineRequest` -- an image (or a precomputed perception) and a prompt with **its own** generation settings
  (:class:`~moai_sdk.modeling.GenerationSettings`: greedy or sampling, temperature, top-p, top-k, repetition
  penalty, stop strings, ``max_new_tokens``, ``seed``), ``n`` choices, an optional ``on_token`` callback,
  ``logprobs`` and a :class:`~moai_sdk.modeling.decoding.TokenConstraint`;
* :class:`RequestState` -- ``WAITING`` (queued for perception) -> ``PREPARED`` (experts, verbalization and the
  processor done; waiting for a KV slot) -> ``RUNNING`` (its rows decode) -> ``FINISHED`` / ``CANCELLED`` /
  ``FAILED``;
* :class:`RequestHandle` -- a future and a stream in one: :meth:`~RequestHandle.result` blocks for the
  :class:`~moai_sdk.results.MoAIResult`, iterating :meth:`~RequestHandle.stream` yields text pieces as tokens are
  generated and then the result, :meth:`~RequestHandle.cancel` frees the row at the next engine step. With
  ``n > 1`` the handle's :attr:`~RequestHandle.choices` are one handle per choice and :meth:`~RequestHandle.result`
  returns their results as a list.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

from ..errors import MoAIError
from ..modeling.decoding import TokenConstraint, TokenLogprobs
from ..modeling.generation import GenerationSettings
from ..results import MoAIResult

#: ``on_token(token_id, text)``: called on the engine thread after each generated token of a row, with the text
#: that became stable with it ("" when none did). An exception raised in it fails that request only.
EngineTokenCallback = Callable[[int, str], None]

_ids = itertools.count()


class EngineError(MoAIError):
    """The engine cannot take or run a request (stopped, request larger than the KV budget, ...)."""


class RequestCancelled(EngineError):
    """The request was cancelled (:meth:`RequestHandle.cancel`) before it finished."""


class EngineTimeout(EngineError, TimeoutError):
    """A wait on the engine ran out of time (``result(timeout=)``, ``stream(timeout=)``, loading). Also a
    built-in ``TimeoutError``, so code written for ``concurrent.futures`` keeps catching it."""


class RequestState(str, enum.Enum):
    WAITING = "waiting"
    PREPARED = "prepared"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(eq=False)
class EngineRequest:
    """One request: inputs, call options and its own validated generation settings."""

    image: Any
    prompt: str
    settings: GenerationSettings
    template: Optional[str] = None
    perception: Any = None
    experts: Any = None
    allow_remote: bool = False
    allow_special_tokens: bool = False
    n: int = 1
    on_token: Optional[EngineTokenCallback] = None
    logprobs: Optional[int] = None
    constraint: Optional[TokenConstraint] = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class RequestOutput:
    """What one choice ended with (besides its :class:`MoAIResult`): why it finished and its step timings."""

    finish_reason: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprobs]] = None
    #: seconds from arrival: when the first token was chosen, and when each later token was
    first_token_s: Optional[float] = None
    token_times: list[float] = field(default_factory=list)


_DONE = object()


class RequestHandle:
    """The caller's side of one request (or of one choice of it): future, stream and cancel."""

    def __init__(self, request: EngineRequest, cancel: Callable[[RequestHandle], None], index: int = 0) -> None:
        self.request = request
        self.index = index
        self.state = RequestState.WAITING
        self.output: Optional[RequestOutput] = None
        self.choices: list[RequestHandle] = [self]
        self._cancel = cancel
        self._done = threading.Event()
        self._result: Optional[MoAIResult] = None
        self._error: Optional[BaseException] = None
        self._pieces: queue.Queue = queue.Queue()
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.request.id if len(self.choices) == 1 or self.index == 0 else f"{self.request.id}/{self.index}"

    # --- caller side ---------------------------------------------------------------------------------------
    def done(self) -> bool:
        return all(c._done.is_set() for c in self.choices)

    @property
    def cancelled(self) -> bool:
        return self.state == RequestState.CANCELLED

    def cancel(self) -> None:
        """Stop this request (every choice): dropped from the queue, or its rows freed at the next engine step."""
        self._cancel(self)

    def result(self, timeout: Optional[float] = None) -> Union[MoAIResult, list[MoAIResult]]:
        """Block until the answer is there: the :class:`MoAIResult` (a list of ``n`` with ``n > 1``). Raises the
        request's error, :class:`RequestCancelled`, or :class:`EngineTimeout` (a ``TimeoutError``) after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for choice in self.choices:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not choice._done.wait(left):
                raise EngineTimeout(f"request {self.id} did not finish within {timeout}s")
            if choice._error is not None:
                raise choice._error
            results.append(choice._result)
        return results if len(self.choices) > 1 else results[0]

    def stream(self, timeout: Optional[float] = None) -> Iterator[Union[str, MoAIResult]]:
        """Text pieces of this choice as they become stable (they concatenate to ``result.text``), then the
        :class:`MoAIResult`. Raises the request's error. Closing the iterator early does not cancel."""
        if len(self.choices) > 1 and self.index == 0 and self.choices[0] is not self:
            raise EngineError("stream one choice at a time: iterate handle.choices[i].stream()")
        while True:
            try:
                item = self._pieces.get(timeout=timeout)
            except queue.Empty:
                raise EngineTimeout(f"request {self.id}: no token within {timeout}s") from None
            if item is _DONE:
                break
            yield item
        if self._error is not None:
            raise self._error
        yield self._result

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """Call ``fn(handle)`` when this choice ends (at once when it already has); on the engine's thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # --- engine side ---------------------------------------------------------------------------------------
    def _piece(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def _finish(
        self,
        result: Optional[MoAIResult] = None,
        error: Optional[BaseException] = None,
        state: RequestState = RequestState.FINISHED,
        tail: str = "",
    ) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error, self.state = result, error, state
            if tail:
                self._pieces.put(tail)
            self._pieces.put(_DONE)
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


__all__ = [
    "EngineRequest",
    "EngineTokenCallback",
    "EngineError",
    "RequestCancelled",
    "RequestHandle",
    "RequestOutput",
    "RequestState",
]
