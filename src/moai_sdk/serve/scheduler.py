"""The dynamic batcher: one thread owns the pipeline and runs the requests that arrive together as one batch.

Requests (:class:`Job`) wait in one FIFO queue. The model thread takes the oldest job, then waits until
``batch_timeout`` seconds after that job's arrival -- or after the end of the previous call, whichever is later --
for more jobs with the same batch key (or until it has ``max_batch_size``), removes them from the queue and runs
them as one left-padded pipeline call, each row of which equals its single run. Jobs with other keys keep their
places for the next call. Counting the window from the end of the previous call lets the clients just answered
come back and join: without it, a steady set of clients splits into groups that take turns (one group waits in
the queue while the other runs), and every call runs half full. Requests the server has received but is still
preparing (decoding the image, counting tokens: :meth:`BatchScheduler.preparing`) extend the wait up to
``PREPARING_WAIT_FACTOR`` windows, so that a burst is not split by how long its images take to decode.

Batch keys (what may share one call, since the pipeline takes one :class:`GenerationSettings` per call):

* greedy requests with the same settings except ``max_new_tokens`` share a call: it runs to the largest
  maximum, and each row is cut back to its own (greedy rows do not depend on the rest of the batch, so the cut
  row is exactly what a call with the smaller maximum gives); sampling fields are ignored for greedy rows;
* sampling requests without a ``seed`` share a call when their settings match (the call draws one seed, which
  the results record);
* a sampling request *with* a ``seed`` runs alone, so that the seed reproduces ``pipe(image, prompt, seed=...)``
  exactly (the pipeline seeds one generator per call, so a batch neighbour would change the draws);
* perception requests (``/v1/perceive``) with the same expert selection share a ``pipe.perceive`` call.

Streaming rows get their text as it becomes stable (:class:`moai_sdk.streaming.AnswerStream`, fed from the
pipeline's ``on_token`` hook), each to its own queue. A job whose client went away is taken out of the queue, or
-- while its batch runs -- its row is discarded; when every row of a running batch is gone, generation stops.
Every job ends with exactly one terminal event (a result or an error): :meth:`Job.finish` and
:meth:`Job.abandon` decide under one lock which side delivers.

If a batched call fails with a :class:`~moai_sdk.errors.MoAIError` before any text was streamed, its rows are
retried one by one, so that one bad request does not fail its neighbours and each gets its own error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Optional

import torch

from ..errors import ConfigError, ExpertError, GenerationError, InputError, MoAIError
from ..modeling.generation import GenerationSettings
from ..pipeline import MoAIPipeline
from ..prompts import build_prompt
from ..results import MoAIResult
from ..streaming import AnswerStream, cut_answer
from .metrics import ServerMetrics
from .protocol import APIError, OutputOptions

logger = logging.getLogger(__name__)

#: While received requests are still being prepared, a batch waits for them up to this many batch windows.
PREPARING_WAIT_FACTOR = 10


def api_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised by the pipeline."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (InputError, GenerationError, ConfigError)):
        return APIError(400, str(exc), code=type(exc).__name__)
    if isinstance(exc, ExpertError):
        return APIError(500, f"a perception expert failed: {exc}", code="expert_error")
    if isinstance(exc, MoAIError):
        return APIError(500, str(exc), code=type(exc).__name__)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def batch_key(settings: GenerationSettings, outputs: Optional[OutputOptions] = None) -> Hashable:
    """What must be equal for two chat requests to share one pipeline call (see the module docstring); requests
    asking for logprobs, n choices or a response_format share a call only with requests asking the same."""
    values = settings.to_dict()
    if outputs is not None and outputs != OutputOptions():
        values["outputs"] = outputs.key
    values.pop("max_new_tokens")
    if not settings.do_sample:
        for name in ("temperature", "top_p", "top_k", "seed"):
            values.pop(name)
    elif settings.seed is not None:
        values["alone"] = uuid.uuid4().hex  # a seeded sampling request runs alone
    return ("chat", tuple(sorted((k, repr(v)) for k, v in values.items())))


@dataclass
class Answer:
    """What a chat job ends with: the row's result and why it ended."""

    result: MoAIResult
    finish_reason: str
    batch_size: int
    #: Every choice (``n`` > 1) as ``(result, finish_reason)``; ``result`` is the first.
    choices: list = dataclasses.field(default_factory=list)


@dataclass(eq=False)
class Job:
    """One request for the model thread: its inputs, its event queue (read on the event loop) and its state."""

    kind: str
    image: Any
    _loop: asyncio.AbstractEventLoop = dataclasses.field(repr=False)
    prompt: Optional[str] = dataclasses.field(default=None, kw_only=True)
    settings: Optional[GenerationSettings] = dataclasses.field(default=None, kw_only=True)
    stream: bool = dataclasses.field(default=False, kw_only=True)
    experts: Optional[list[str]] = dataclasses.field(default=None, kw_only=True)
    outputs: OutputOptions = dataclasses.field(default_factory=OutputOptions, kw_only=True)
    id: str = dataclasses.field(init=False, default_factory=lambda: uuid.uuid4().hex)
    arrived: float = dataclasses.field(init=False, default_factory=time.perf_counter)
    started: Optional[float] = dataclasses.field(init=False, default=None)
    first_text: Optional[float] = dataclasses.field(init=False, default=None)
    events: asyncio.Queue = dataclasses.field(init=False, repr=False, default_factory=asyncio.Queue)
    cancelled: threading.Event = dataclasses.field(init=False, repr=False, default_factory=threading.Event)
    _lock: threading.Lock = dataclasses.field(init=False, repr=False, default_factory=threading.Lock)
    _ended: bool = dataclasses.field(init=False, repr=False, default=False)

    def __post_init__(self) -> None:
        chat = self.kind == "chat"
        self.key: Hashable = batch_key(self.settings, self.outputs) if chat else ("perceive", tuple(self.experts or ()))

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens if self.settings is not None else 0

    def _post(self, event: tuple[str, Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody reads this job
            logger.debug("job %s: event %s dropped, the event loop is closed", self.id, event[0])

    def emit(self, kind: str, payload: Any) -> None:
        """A non-terminal event (a streamed text piece)."""
        if not self._ended and not self.cancelled.is_set():
            self._post((kind, payload))

    def finish(self, kind: str, payload: Any) -> bool:
        """The terminal event (``"result"`` or ``"error"``), posted at most once; False if the job already ended."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        self._post((kind, payload))
        return True

    def abandon(self) -> bool:
        """End the job from the client's side (timeout, disconnect). False when a terminal event was already
        posted -- the caller then reads it from :attr:`events` instead of answering a second time."""
        self.cancelled.set()
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            return True


@dataclass
class _Row:
    job: Job
    stream: Optional[AnswerStream]
    count: int = 0
    ended: bool = False


class _AllGone(Exception):
    """Raised inside generation when every row of the batch was abandoned: stops the call."""


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about the loaded model."""

    name: str
    image_tokens: int
    aux_tokens: int  # compressed auxiliary tokens the mixer reads (compressor latents)
    max_context: int
    eos_token_id: int

    @classmethod
    def of(cls, pipe: MoAIPipeline, name: str) -> ModelInfo:
        """The facts of ``pipe``'s loaded model, served as ``name``."""
        model = pipe.model
        return cls(
            name=name,
            image_tokens=int(pipe.processor.num_image_tokens),
            aux_tokens=int(model.config.structure.compressor_latents),
            max_context=int(model.config.context_window),
            eos_token_id=int(model.config.eos_token_id),
        )


class BatchScheduler:
    """Owns ``pipe``: loads it on its thread, then runs queued jobs in dynamic batches (module docstring)."""

    def __init__(
        self,
        pipe: MoAIPipeline,
        *,
        max_batch_size: int = 8,
        batch_timeout: float = 0.02,
        max_queue: int = 64,
        metrics: Optional[ServerMetrics] = None,
        served_name: Optional[str] = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or batch_timeout < 0:
            raise ConfigError("max_batch_size and max_queue must be >= 1 and batch_timeout >= 0")
        self.pipe = pipe
        self.max_batch_size = int(max_batch_size)
        self.batch_timeout = float(batch_timeout)
        self.max_queue = int(max_queue)
        self.metrics = metrics or ServerMetrics()
        self.served_name = served_name or pipe.model_id
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.info: Optional[ModelInfo] = None
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._batch_seconds = 1.0  # running mean of one call, for Retry-After
        self._free_since = 0.0  # when the previous call ended (perf_counter)
        self._preparing = 0  # requests received, not yet queued

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the model thread (idempotent); it loads the pipeline, then serves the queue."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="moai-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, end the queued ones with a 503, let the running batch finish, join the thread."""
        with self._cond:
            self._stopping = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.finish("error", APIError(503, "the server is shutting down", code="shutting_down"))
        self.metrics.queue_depth.set(0)
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            t0 = time.perf_counter()
            self.pipe.load()
            self.info = ModelInfo.of(self.pipe, self.served_name)
            logger.info("model %s loaded in %.1fs; serving", self.pipe.model_id, time.perf_counter() - t0)
        except BaseException as exc:  # reported by /health and every request; the thread ends
            logger.exception("loading the pipeline failed")
            self.load_error = exc
            return
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    # --- queue -------------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it, in batches, times a batch's duration."""
        batches = len(self._pending) / self.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches))

    def check_capacity(self) -> None:
        """A 429 (with ``Retry-After``) when the queue is full, a 503 when stopping."""
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if len(self._pending) >= self.max_queue:
            raise APIError(
                429,
                f"the server's queue is full ({self.max_queue} waiting requests); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            )

    def submit(self, job: Job) -> None:
        """Queue ``job``, or :meth:`check_capacity`'s error."""
        with self._cond:
            self.check_capacity()
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the work between a request's arrival and :meth:`submit`: a forming batch waits for it."""
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    def cancel(self, job: Job) -> bool:
        """The client gave up on ``job``: drop it from the queue or discard its row. Returns :meth:`Job.abandon`."""
        abandoned = job.abandon()
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                self._cond.notify_all()
        return abandoned

    def _compatible(self, key: Hashable) -> list[Job]:
        return [j for j in self._pending if j.key == key][: self.max_batch_size]

    def _next_batch(self) -> Optional[list[Job]]:
        """Block until a batch is due; take it out of the queue. None when stopping."""
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending[0]
                start = max(first.arrived, self._free_since)
                deadline = start + self.batch_timeout
                extended = start + PREPARING_WAIT_FACTOR * self.batch_timeout
                group = self._compatible(first.key)
                while len(group) < self.max_batch_size and not self._stopping:
                    remaining = (extended if self._preparing else deadline) - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    if not self._pending or self._pending[0] is not first:
                        break  # the oldest job left (cancelled): decide again
                    group = self._compatible(first.key)
                if self._stopping:
                    return None
                if not self._pending or self._pending[0] is not first:
                    continue
                group = self._compatible(first.key)
                for job in group:
                    self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                return group

    # --- running -----------------------------------------------------------------------------------------

    def _run(self, batch: list[Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            job.started = now
            self.metrics.queue_wait.observe(now - job.arrived)
        self.metrics.running.set(len(batch))
        try:
            if batch[0].kind == "perceive":
                self._run_perceive(batch)
            else:
                self._run_chat(batch)
        finally:
            self.metrics.running.set(0)
            self._free_since = time.perf_counter()
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (self._free_since - now)

    def _run_perceive(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled.is_set()]
        if not live:
            return
        try:
            results = self.pipe.perceive([j.image for j in live], experts=live[0].experts)
        except Exception as exc:
            if len(live) > 1 and isinstance(exc, MoAIError):
                for job in live:
                    self._run_perceive([job])
                return
            self._fail(live, exc)
            return
        self.metrics.batch(len(live), {})
        for job, result in zip(live, results):
            job.finish("result", result)

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        error = api_error(exc)
        if error.status >= 500:
            logger.error("a batch of %d failed: %s", len(jobs), exc, exc_info=exc)
        for job in jobs:
            job.finish("error", error)

    def _run_chat(self, batch: list[Job]) -> None:
        live = [j for j in batch if not j.cancelled.is_set()]
        if not live:
            return
        settings = dataclasses.replace(live[0].settings, max_new_tokens=max(j.max_new_tokens for j in live))
        eos = set(settings.eos_token_id if isinstance(settings.eos_token_id, list) else [settings.eos_token_id])
        if settings.eos_token_id is None:
            eos = {self.info.eos_token_id if self.info else self.pipe.tokenizer.eos_token_id}
        outputs = live[0].outputs  # equal for the whole batch (batch_key)
        n = outputs.n
        rows = [_Row(j, AnswerStream(self.decode, settings.stop) if j.stream and n == 1 else None) for j in live]
        # beam search has no per-step hook; n choices stream each whole choice at the end
        hook = self._on_token(rows, eos) if settings.num_beams == 1 and n == 1 else None
        extra: dict[str, Any] = {"logprobs": outputs.logprobs, "response_format": outputs.response_format}
        if n > 1:
            extra["n"] = n
        try:
            results = self.pipe(
                [j.image for j in live],
                [j.prompt for j in live],
                generation_config=settings,
                on_token=hook,
                **extra,
            )
        except _AllGone:
            logger.info("every client of a batch of %d went away; generation stopped", len(live))
            for row in rows:
                row.job.finish("error", APIError(499, "the client went away", code="client_gone"))
            return
        except Exception as exc:
            streamed = any(row.count for row in rows if row.stream is not None)
            if len(live) > 1 and isinstance(exc, MoAIError) and not streamed:
                logger.info("a batch of %d failed (%s); running its rows one by one", len(live), exc)
                for job in live:
                    self._run_chat([job])
                return
            self._fail(live, exc)
            return
        self.metrics.batch(len(live), results[0].timings if results else {})
        for i, row in enumerate(rows):
            self._deliver(row, results[i * n : (i + 1) * n], settings, eos, len(live))

    def _on_token(self, rows: list[_Row], eos: set[int]) -> Callable[[torch.Tensor], None]:
        """The pipeline's per-step hook: feed each streaming row's :class:`AnswerStream`; stop when all left."""

        def on_token(ids: torch.Tensor) -> None:
            values = ids.tolist()
            alive = False
            for row, token in zip(rows, values):
                job = row.job
                if job.cancelled.is_set():
                    continue
                alive = True
                if row.stream is None or row.ended:
                    continue
                row.count += 1
                piece = row.stream.push(int(token))
                if piece:
                    if job.first_text is None:
                        job.first_text = time.perf_counter()
                        self.metrics.first_token.observe(job.first_text - job.arrived)
                    job.emit("delta", piece)
                if int(token) in eos or row.count >= job.max_new_tokens:
                    row.ended = True
            if not alive:
                raise _AllGone()

        return on_token

    def _deliver(
        self, row: _Row, results: list[MoAIResult], settings: GenerationSettings, eos: set[int], size: int
    ) -> None:
        job = row.job
        if job.cancelled.is_set():
            return
        limit = job.max_new_tokens
        choices = []
        for result in results:
            ids = list(result.new_token_ids)
            reason = result.finish_reason
            if len(ids) > limit:  # the batch ran to a larger maximum: cut this row back to its own
                ids = ids[:limit]
                counts = {**result.token_counts, "generated": len(ids)}
                update: dict[str, Any] = {
                    "new_token_ids": ids,
                    "token_counts": counts,
                    "generation": {**result.generation, "max_new_tokens": limit},
                }
                if job.outputs.response_format is None:
                    update["text"] = self.pipe.answer_text(ids, settings.stop)
                if result.logprobs is not None:
                    update["logprobs"] = result.logprobs[:limit]
                result = result.model_copy(update=update)
                reason = None
            if reason is None or job.outputs.response_format is None:
                reason = self.finish_reason(ids, limit, settings.stop, eos)
            choices.append((result, reason))
        if row.stream is not None:
            tail = row.stream.finish(choices[0][0].text)
            if tail:
                job.emit("delta", tail)
        job.finish("result", Answer(choices[0][0], choices[0][1], size, choices))

    def finish_reason(self, ids: list[int], limit: int, stop: list[str], eos: set[int]) -> str:
        """``"stop"`` when the answer ended by itself (EOS, a stop string, the chat marker), else ``"length"``."""
        if len(ids) < limit or (ids and ids[-1] in eos):
            return "stop"
        full = self.decode(ids)
        return "stop" if len(cut_answer(full, stop)) < len(full) else "length"

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text as answers are decoded (special tokens skipped, chat markers kept, not cut)."""
        return self.pipe.tokenizer.decode(list(ids), skip_special_tokens=True, keep_chat_markers=True)

    # --- request-side helpers (called from the web server's threads) -------------------------------------

    def context_tokens(self, prompt: str) -> int:
        """Text + image positions the language model prefills for ``prompt`` (``token_counts["context"]``)."""
        text = build_prompt(prompt, self.pipe.template)
        return len(self.pipe.tokenizer.encode(text)) - 1 + self.info.image_tokens  # <image> is not text
