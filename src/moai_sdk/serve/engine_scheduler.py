"""The server's scheduler on the continuous-batching engine (:class:`moai_sdk.engine.MoAIEngine`).

It offers the web app what :class:`~moai_sdk.serve.scheduler.BatchScheduler` offered (``submit``, ``cancel``,
``check_capacity`` with the 429 queue limit, ``preparing``, ``ready`` ...) and runs chat jobs as engine requests:

* ``--scheduling continuous`` (default): rows join and leave the running batch at every decoding step, so a short
  answer never waits for a long one; ``static``: a batch is formed only when the previous one has ended (the
  request-level batching ``moai serve`` did before, kept as the benchmarks' baseline; ``--batch-timeout-ms`` is
  its companion window);
* each request keeps its own settings (greedy or sampling, seed, stop strings, length) and its answer is exactly
  its single run's; streaming clients get each token's stable text as soon as it is generated;
* a cancelled or disconnected request frees its row at the next step; jobs waiting for perception or admission
  count against ``--max-queue`` (429 with ``Retry-After``);
* ``/metrics`` adds running and waiting rows, KV cache bytes in use / reserved, step time, time to first token and
  inter-token latency histograms.

Perception-only jobs (``/v1/perceive``) run one at a time on a thread of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

from ..engine import EngineStats, MoAIEngine, RequestCancelled, RequestHandle
from ..errors import ConfigError, GenerationError, MoAIError
from ..pipeline import MoAIPipeline
from ..prompts import build_prompt
from ..results import MoAIResult
from .metrics import ServerMetrics
from .protocol import APIError
from .scheduler import Answer, Job, ModelInfo, api_error

logger = logging.getLogger(__name__)


class EngineScheduler:
    """Runs the server's jobs on a :class:`MoAIEngine` (module docstring)."""

    def __init__(
        self,
        pipe: MoAIPipeline,
        *,
        scheduling: str = "continuous",
        max_num_seqs: int = 8,
        kv_budget: Union[int, float, None] = None,
        max_num_batched_tokens: int = 4096,
        batch_timeout: float = 0.05,
        max_queue: int = 64,
        metrics: Optional[ServerMetrics] = None,
        served_name: Optional[str] = None,
    ) -> None:
        if max_queue < 1:
            raise ConfigError("max_queue must be >= 1")
        self.pipe = pipe
        self.max_queue = int(max_queue)
        self.metrics = metrics or ServerMetrics()
        self.served_name = served_name or pipe.model_id
        self.engine = MoAIEngine(
            pipe,
            max_num_seqs=max_num_seqs,
            kv_budget=kv_budget,
            max_num_batched_tokens=max_num_batched_tokens,
            scheduling=scheduling,
            static_wait=batch_timeout if scheduling == "static" else 0.0,
        )
        self.max_batch_size = max_num_seqs
        self.engine.listeners.append(self._on_step)
        self.engine.admission_listeners.append(self._on_admission)
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.info: Optional[ModelInfo] = None
        self._lock = threading.Lock()
        self._handles: dict[Job, RequestHandle] = {}
        self._accepted = 0  # chat jobs submitted and not finished
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._perceive: queue.Queue = queue.Queue()
        self._perceive_waiting = 0
        self._running_rows = 0

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._main, name="moai-serve-engine", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        try:
            t0 = time.perf_counter()
            self.engine.start(wait=True)
            self.info = ModelInfo.of(self.pipe, self.served_name)
            logger.info("model %s loaded in %.1fs; serving", self.pipe.model_id, time.perf_counter() - t0)
        except BaseException as exc:
            logger.exception("loading the pipeline failed")
            self.load_error = exc.__cause__ or exc
            return
        self.ready.set()
        while True:  # perception-only jobs, one at a time
            job = self._perceive.get()
            if job is None:
                return
            with self._lock:
                self._perceive_waiting -= 1
            self._run_perceive(job)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._perceive.put(None)
        self.engine.stop(timeout)
        with self._lock:
            handles = list(self._handles.items())
        for job, _ in handles:
            job.finish("error", APIError(503, "the server is shutting down", code="shutting_down"))
        self.metrics.queue_depth.set(0)
        if self._thread is not None:
            self._thread.join(timeout)

    # --- queue -----------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests accepted and waiting: for perception (the one being prepared does not count, as a request
        the batcher had taken did not), for a KV slot, or for the perceive thread."""
        stats = self.engine.stats()
        return stats.waiting - stats.preparing + self._perceive_waiting

    def retry_after(self) -> int:
        stats = self.engine.stats()
        step = stats.mean_step_seconds or 0.05
        return max(1, math.ceil(step * 64 * (self.queue_depth / max(1, self.max_batch_size) + 1)))

    def check_capacity(self) -> None:
        if self._stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.queue_depth >= self.max_queue:
            raise APIError(
                429,
                f"the server's queue is full ({self.max_queue} waiting requests); retry later",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            )

    @contextmanager
    def preparing(self) -> Iterator[None]:
        yield  # the engine admits per step: nothing waits for requests still being received

    def submit(self, job: Job) -> None:
        self.check_capacity()
        if job.kind == "perceive":
            with self._lock:
                self._perceive_waiting += 1
            self.metrics.queue_depth.set(self.queue_depth)
            self._perceive.put(job)
            return
        state: dict[str, Any] = {"first": None, "last": None, "text": ""}

        def on_token(token_id: int, piece: str) -> None:
            now = time.perf_counter()
            if state["first"] is None:
                state["first"] = now
                job.started = job.started or now
                self.metrics.first_token.observe(now - job.arrived)
            else:
                self.metrics.inter_token.observe(now - state["last"])
            state["last"] = now
            if piece and job.stream:
                if job.first_text is None:
                    job.first_text = now
                state["text"] += piece
                job.emit("delta", piece)

        outputs = job.outputs
        stream = on_token if outputs.n == 1 else None  # n choices arrive whole (see app._sse)
        fmt = outputs.response_format
        if fmt is None:
            handles = [
                self._engine_submit(
                    [],
                    job.image,
                    job.prompt,
                    generation_config=job.settings,
                    on_token=stream,
                    n=outputs.n,
                    logprobs=outputs.logprobs,
                )
            ]
            constraints: list[Any] = [None] * outputs.n
        else:
            # a constraint holds one matcher's state: each choice is its own engine request, choice j seeded
            # seed + j as the engine seeds its n choices (the perception comes from the expert cache)
            constraints = [self.pipe.structured.constraint(fmt) for _ in range(outputs.n)]
            handles = []
            for j, constraint in enumerate(constraints):
                settings = job.settings
                if outputs.n > 1 and settings.do_sample and settings.seed is not None:
                    settings = dataclasses.replace(settings, seed=(settings.seed + j) % 2**64)
                handles.append(
                    self._engine_submit(
                        handles,
                        job.image,
                        job.prompt,
                        generation_config=settings,
                        on_token=stream,
                        logprobs=outputs.logprobs,
                        constraint=constraint,
                    )
                )
        handle = _Handles(handles)
        with self._lock:
            self._handles[job] = handle
        self.metrics.queue_depth.set(self.queue_depth)
        remaining = [sum(len(h.choices) for h in handles)]
        counter = threading.Lock()

        def one_done(_h: RequestHandle) -> None:
            with counter:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._done(job, handle, constraints, state["text"] if stream is not None else None)

        for h in handles:
            for choice in h.choices:
                choice.add_done_callback(one_done)
        if job.cancelled.is_set():  # abandoned meanwhile
            handle.cancel()

    def _engine_submit(self, submitted: list[RequestHandle], *args: Any, **kwargs: Any) -> RequestHandle:
        """``engine.submit``; a request the engine refuses (``n`` above ``--max-num-seqs``, ...) is the client's
        error (400), and the choices already submitted for the job are cancelled."""
        try:
            return self.engine.submit(*args, **kwargs)
        except MoAIError as exc:
            for h in submitted:
                h.cancel()
            raise APIError(400, str(exc), code=type(exc).__name__) from exc

    def _done(self, job: Job, handle: _Handles, constraints: list[Any], streamed: Optional[str] = None) -> None:
        with self._lock:
            self._handles.pop(job, None)
        try:
            choices = self._choices(job, handle, constraints)
            result = choices[0][0]
        except RequestCancelled:
            job.finish("error", APIError(499, "the client went away", code="client_gone"))
            return
        except Exception as exc:
            error = api_error(exc)
            if error.status >= 500:
                logger.error("request %s failed: %s", job.id, exc, exc_info=exc)
            job.finish("error", error)
            return
        self.metrics.request_stages(result.timings)
        if (
            job.stream
            and streamed is not None
            and result.text.startswith(streamed)
            and len(result.text) > len(streamed)
        ):
            job.emit("delta", result.text[len(streamed) :])  # text held back while it could still change (an
            # incomplete UTF-8 sequence at the end): the stream concatenates to the answer
        job.finish("result", Answer(result, choices[0][1], max(1, self._running_rows), choices))

    def _choices(self, job: Job, handle: _Handles, constraints: list[Any]) -> list[tuple[MoAIResult, str]]:
        """Every choice's result and finish reason: typed log-probabilities, and for structured answers the
        grammar's text and the parsed value."""
        choices = []
        for choice, constraint in zip(handle.choices, constraints):
            result, output = choice.result(0), choice.output
            reason = output.finish_reason
            update: dict[str, Any] = {"finish_reason": reason}
            if output.logprobs is not None:
                update["logprobs"] = self.pipe.token_logprobs(output.logprobs)
            if constraint is not None:
                text = constraint.text
                stops = [text.find(s) for s in job.settings.stop if s and s in text]
                update["text"] = text[: min(stops)] if stops else text
                if constraint.is_terminated():
                    reason = update["finish_reason"] = "stop"
                    try:
                        update["parsed"] = constraint.format.parse(update["text"])
                    except GenerationError as exc:
                        logger.info("request %s: the structured answer does not parse: %s", job.id, exc)
            choices.append((result.model_copy(update=update), reason))
        return choices

    def cancel(self, job: Job) -> bool:
        abandoned = job.abandon()
        with self._lock:
            handle = self._handles.get(job)
        if handle is not None:
            handle.cancel()
        return abandoned

    # --- engine hooks (engine thread) ------------------------------------------------------------------------
    def _on_step(self, seconds: Optional[float], stats: EngineStats) -> None:
        self._running_rows = stats.running
        m = self.metrics
        if seconds is not None:
            m.step_seconds.observe(seconds)
        m.running.set(stats.running)
        m.waiting.set(stats.waiting)
        m.queue_depth.set(stats.waiting - stats.preparing + self._perceive_waiting)
        m.kv_used.set(stats.kv_used_bytes)
        m.kv_reserved.set(stats.kv_reserved_bytes)
        m.kv_allocated.set(stats.kv_allocated_bytes)

    def _on_admission(self, admitted: int, running: int) -> None:
        self._running_rows = running
        self.metrics.batch_size.observe(admitted)
        now = time.perf_counter()
        with self._lock:
            jobs = list(self._handles)
        for job in jobs:
            if job.started is None and self._handles.get(job) is not None and self._handles[job].state == "running":
                job.started = now
                self.metrics.queue_wait.observe(now - job.arrived)

    # --- perception jobs -------------------------------------------------------------------------------------
    def _run_perceive(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        job.started = time.perf_counter()
        self.metrics.queue_wait.observe(job.started - job.arrived)
        try:
            result = self.pipe.perceive(job.image, experts=job.experts)
        except Exception as exc:
            job.finish("error", api_error(exc))
            return
        self.metrics.batch(1, {})
        job.finish("result", result)

    # --- request-side helpers --------------------------------------------------------------------------------
    def context_tokens(self, prompt: str) -> int:
        text = build_prompt(prompt, self.pipe.template)
        return len(self.pipe.tokenizer.encode(text)) - 1 + self.info.image_tokens

    def decode(self, ids: list[int]) -> str:
        return self.pipe.tokenizer.decode(list(ids), skip_special_tokens=True, keep_chat_markers=True)

    def describe(self) -> dict[str, Any]:
        stats = self.engine.stats()
        return {"scheduling": self.engine.scheduling, "running": stats.running, "waiting": stats.waiting}


class _Handles:
    """The engine requests of one server job (one with ``n`` choices, or one per choice when each choice needs
    its own grammar matcher): their choices in order, cancelled together."""

    def __init__(self, handles: list[RequestHandle]) -> None:
        self.handles = handles
        self.choices = [c for h in handles for c in h.choices]

    @property
    def state(self) -> Any:
        return self.handles[0].state

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()


__all__ = ["EngineScheduler"]
