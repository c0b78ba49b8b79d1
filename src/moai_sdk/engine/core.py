"""`MoAIEngine`: continuous (iteration-level) batching over a loaded :class:`~moai_sdk.pipeline.MoAIPipeline`.

Parts (one module each, named after vLLM v1's engine core):

=================  ===========================================================================================
``requests``       :class:`EngineRequest`, :class:`RequestState`, :class:`RequestHandle` (future + stream)
``perception``     :class:`PerceptionWorker` -- experts, verbalization, processor, ahead of admission
``scheduler``      :class:`Scheduler` -- admits prepared requests per step (``continuous`` or ``static``)
``kv_pool``        :class:`KVPool` -- the batched KV cache of the running rows, under a byte budget
``sampler``        :class:`Sampler` -- the decoding core over rows with their own settings and generators
``runner``         :class:`DecodeRunner` -- one decoding step, eager or CUDA graphs per batch-size bucket
``core``           :class:`MoAIEngine` -- the engine thread: admit + prefill, one decode step, retire
=================  ===========================================================================================

Each engine step (on the engine thread):

1. rows whose request was cancelled leave (their slots are freed);
2. the scheduler admits prepared requests; each gets its vision tower, compressor and prefill -- one request at a
   time, with batch size 1, exactly as a single call computes them -- into its pool slot (``n`` choices: one
   prefill, its keys/values copied into ``n`` slots); the prefill's logits give each new row its first token;
3. one decoding step for every running row (:meth:`~moai_sdk.modeling.MoAIForCausalLM.decode_rows`: rows of
   different lengths, each with its own positions and key mask) and one :class:`Sampler` step;
4. rows that produced EOS, a stop string, their constraint's end or their own ``max_new_tokens`` retire at once;
   their :class:`~moai_sdk.results.MoAIResult` is delivered and their KV slot is free for the next step.

A greedy row gives the tokens of its single run (``pipe(image, prompt)``) whatever joins or leaves the batch:
its prefill is the single run's, and a decoding step computes each row on its own keys (the logits agree with
the single run's to float rounding -- batched matrix products may sum in another order). A sampling row draws
from its own generator, seeded as the single run seeds its one, so ``seed=`` reproduces
``pipe(image, prompt, seed=...)``. Beam search is not an engine mode (use the pipeline).
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from ..devices import synchronize
from ..errors import ConfigError, GenerationError, InputError
from ..modeling.decoding import StopCriteria, TokenConstraint, eos_ids, seen_from_prompt
from ..modeling.generation import GenerationSettings
from ..pipeline import MoAIPipeline
from ..results import MoAIResult
from ..streaming import AnswerStream, cut_answer
from .kv_pool import KVPool, resolve_budget
from .perception import PerceptionWorker
from .requests import (
    EngineError,
    EngineRequest,
    EngineTimeout,
    EngineTokenCallback,
    RequestCancelled,
    RequestHandle,
    RequestOutput,
    RequestState,
)
from .runner import DecodeRunner
from .sampler import Sampler, row_generator
from .scheduler import PreparedRequest, Row, Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: rows running, requests waiting, KV memory, steps."""

    running: int
    waiting: int  #: submitted, not decoding yet (in perception, or prepared and waiting for a KV slot)
    preparing: int  #: of ``waiting``: the request perception is working on now
    kv_used_bytes: int
    kv_reserved_bytes: int
    kv_allocated_bytes: int
    kv_budget_bytes: int
    steps: int
    mean_step_seconds: float


#: ``listener(step_seconds, stats)`` -- called on the engine thread after every decoding step, and with
#: ``step_seconds=None`` when the batch emptied.
StepListener = Callable[[float, EngineStats], None]


class MoAIEngine:
    """Continuous batching for a pipeline: submit requests, get a future / stream per request.

    Args:
        pipe: the pipeline (loaded on the engine thread when the engine starts).
        max_num_seqs: most rows decoding together.
        kv_budget: bytes for the KV pool, or a fraction (float in (0, 1]) of the free CUDA memory; default:
            half the free CUDA memory, 4 GiB elsewhere. A request is admitted only when its prompt and
            ``max_new_tokens`` fit, so nothing runs out of memory mid-answer.
        max_num_batched_tokens: per-step token budget (decode rows + newcomers' prefill positions).
        scheduling: ``"continuous"`` (default) or ``"static"`` (admit only into an empty batch: request-level
            batching, the baseline).
        max_prepared: how many requests perception may prepare ahead of admission (default: ``2 * max_num_seqs``).
        static_wait: with ``"static"``, seconds an empty batch waits for companions (from its first prepared
            request or the end of the previous batch), as a request-level batcher's window.
        cuda_graphs: decode with fixed-shape steps replayed as CUDA graphs captured per batch-size bucket
            (:mod:`moai_sdk.engine.runner`); default: on CUDA. ``True`` elsewhere runs the same fixed-shape steps
            without graphs.

    Use it as a context manager, or :meth:`start` / :meth:`stop`::

        with MoAIEngine(pipe, max_num_seqs=8) as engine:
            handle = engine.submit(image, "What is in the picture?", max_new_tokens=64)
            print(handle.result().text)
    """

    def __init__(
        self,
        pipe: MoAIPipeline,
        *,
        max_num_seqs: int = 8,
        kv_budget: Union[int, float, None] = None,
        max_num_batched_tokens: int = 4096,
        scheduling: str = "continuous",
        max_prepared: Optional[int] = None,
        static_wait: float = 0.0,
        cuda_graphs: Optional[bool] = None,
    ) -> None:
        if not isinstance(pipe, MoAIPipeline):
            raise ConfigError(f"MoAIEngine needs a MoAIPipeline; got {type(pipe).__name__}")
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be an integer >= 1; got {max_num_seqs!r}")
        self.pipe = pipe
        self.max_num_seqs = max_num_seqs
        self.kv_budget = kv_budget
        resolve_budget(kv_budget, torch.device("cpu"))  # type/range check now (CUDA fractions resolve at start)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.scheduling = scheduling
        if scheduling not in ("continuous", "static"):
            raise ConfigError(f"scheduling must be 'continuous' or 'static'; got {scheduling!r}")
        if isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int):
            raise ConfigError(f"max_num_batched_tokens must be an integer; got {max_num_batched_tokens!r}")
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1; got {max_num_batched_tokens}")
        self.static_wait = float(static_wait)
        self.cuda_graphs = cuda_graphs
        self.max_prepared = int(max_prepared) if max_prepared is not None else 2 * max_num_seqs
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.listeners: list[StepListener] = []
        #: ``fn(admitted, running)`` -- called on the engine thread after a step admitted requests
        self.admission_listeners: list[Callable[[int, int], None]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._scheduler: Optional[Scheduler] = None
        self._pool: Optional[KVPool] = None
        self._sampler: Optional[Sampler] = None
        self._runner: Optional[DecodeRunner] = None
        self._worker: Optional[PerceptionWorker] = None
        self._cancelled: set[RequestHandle] = set()
        self._steps = 0
        self._step_times: deque[float] = deque(maxlen=256)
        self._started_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, wait: bool = False) -> MoAIEngine:
        """Start the engine thread (it loads the pipeline) and the perception worker; idempotent. ``wait=True``
        blocks until the model is loaded (and raises if loading failed)."""
        with self._started_lock:
            if self._thread is None:
                self._worker = PerceptionWorker(
                    self.pipe, self._deliver, self._fail_handles, room=self._has_room, wait_room=self._wait_room
                )
                self._thread = threading.Thread(target=self._main, name="moai-engine", daemon=True)
                self._thread.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        if not self.ready.wait(timeout):
            raise EngineTimeout("the engine did not finish loading in time")
        if self.load_error is not None:
            raise EngineError(f"the engine failed to load the pipeline: {self.load_error}") from self.load_error

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, fail the unfinished ones (:class:`EngineError`), join the threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._worker is not None:
            self._worker.stop(timeout)
            while not self._worker.queue.empty():
                item = self._worker.queue.get_nowait()
                if item is not None:
                    self._fail_handles(item[1], EngineError("the engine stopped before this request ran"))

    def __enter__(self) -> MoAIEngine:
        return self.start(wait=True)

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- submitting ----------------------------------------------------------------------------------------------
    def submit(
        self,
        image: Any,
        prompt: str,
        *,
        generation_config: Any = None,
        template: Optional[str] = None,
        perception: Any = None,
        experts: Any = None,
        n: int = 1,
        on_token: Optional[EngineTokenCallback] = None,
        logprobs: Optional[int] = None,
        constraint: Optional[TokenConstraint] = None,
        allow_remote: bool = False,
        allow_special_tokens: bool = False,
        **generation: Any,
    ) -> RequestHandle:
        """Queue one request; returns its :class:`RequestHandle` at once.

        Takes the options of :meth:`MoAIPipeline.__call__ <moai_sdk.pipeline.MoAIPipeline.__call__>` for one
        image and one prompt -- generation fields (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k``, ``repetition_penalty``, ``stop``, ``seed``; a sampling request without a seed gets one drawn
        and recorded) over ``generation_config``, ``template``, ``perception``, ``experts`` -- plus ``n`` choices
        from one perception and one prefill (choice ``j`` seeded ``seed + j``), ``on_token(token_id, text)``,
        ``logprobs`` (0..20 alternatives per token, from the raw logits) and a ``constraint``
        (:class:`~moai_sdk.modeling.decoding.TokenConstraint`). Settings are checked here (typed errors).
        """
        if self._stopping:
            raise EngineError("the engine is stopped; create a new one")
        if not isinstance(prompt, str):
            raise InputError(f"submit takes one prompt (a str); got {type(prompt).__name__}")
        settings = GenerationSettings.from_any(
            self.pipe.generation_config if generation_config is None else generation_config, **generation
        )
        if settings.num_beams > 1:
            raise GenerationError("the engine decodes greedy and sampling rows; run beam search with the pipeline")
        if settings.do_sample and settings.seed is None:
            settings.seed = random.SystemRandom().randrange(2**31)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_num_seqs:
            raise GenerationError(f"n must be an integer in 1..max_num_seqs ({self.max_num_seqs}); got {n!r}")
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20
        ):
            raise GenerationError(f"logprobs must be an integer in 0..20 (or None); got {logprobs!r}")
        if constraint is not None and not isinstance(constraint, TokenConstraint):
            raise GenerationError("constraint must implement TokenConstraint (allowed_tokens, accept, is_terminated)")
        if constraint is not None and n > 1:
            raise GenerationError("a constraint object holds one matcher's state: use n=1 with a constraint")
        request = EngineRequest(
            image=image,
            prompt=prompt,
            settings=settings,
            template=template,
            perception=perception,
            experts=experts,
            allow_remote=allow_remote,
            allow_special_tokens=allow_special_tokens,
            n=n,
            on_token=on_token,
            logprobs=logprobs,
            constraint=constraint,
        )
        handles = [RequestHandle(request, self._cancel, index=j) for j in range(n)]
        group = handles[0] if n == 1 else RequestHandle(request, self._cancel, index=0)
        if n > 1:
            group.choices = handles
            for h in handles:
                h.choices = [h]
        self.start()
        self._worker.submit(request, handles)
        return group

    def generate(self, images: Sequence[Any], prompts: Sequence[str], **options: Any) -> list[MoAIResult]:
        """Submit every (image, prompt) pair (same options) and wait for all: results in input order."""
        if len(images) != len(prompts):
            raise EngineError(f"{len(images)} images and {len(prompts)} prompts; pass one image per prompt")
        handles = [self.submit(img, p, **options) for img, p in zip(images, prompts)]
        return [h.result() for h in handles]

    def cancel(self, handle: RequestHandle) -> None:
        self._cancel(handle)

    def _cancel(self, handle: RequestHandle) -> None:
        for choice in handle.choices:
            if choice.done():
                continue
            choice._finish(error=RequestCancelled(f"request {choice.id} was cancelled"), state=RequestState.CANCELLED)
            with self._cond:
                self._cancelled.add(choice)
                self._cond.notify_all()

    # --- state ---------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        pool, sched = self._pool, self._scheduler
        waiting = (self._worker.waiting if self._worker else 0) + (len(sched.waiting) if sched else 0)
        times = list(self._step_times)
        return EngineStats(
            running=len(sched.running) if sched else 0,
            waiting=waiting,
            preparing=int(self._worker.busy) if self._worker else 0,
            kv_used_bytes=pool.used_bytes if pool else 0,
            kv_reserved_bytes=pool.reserved_bytes if pool else 0,
            kv_allocated_bytes=pool.allocated_bytes if pool else 0,
            kv_budget_bytes=pool.budget_bytes if pool else 0,
            steps=self._steps,
            mean_step_seconds=statistics.fmean(times) if times else 0.0,
        )

    # --- perception worker callbacks ---------------------------------------------------------------------------
    def _has_room(self) -> bool:
        sched = self._scheduler
        return sched is None or len(sched.waiting) < self.max_prepared or self._stopping

    def _wait_room(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait(seconds)

    def _deliver(self, prepared: PreparedRequest) -> None:
        self.wait_ready()
        rows = len(prepared.handles)
        if not self._pool.fits_alone(prepared.reserve, rows):
            need = prepared.reserve * rows * self._pool.per_position
            raise EngineError(
                f"the request needs {prepared.reserve:,} KV positions x {rows} row(s) = {need / 2**20:.1f} MiB, more "
                f"than the KV budget of {self._pool.budget_bytes / 2**20:.1f} MiB (or max_num_seqs); raise kv_budget "
                "or lower max_new_tokens"
            )
        with self._cond:
            if self._stopping:
                raise EngineError("the engine stopped before this request ran")
            self._scheduler.add(prepared)
            self._cond.notify_all()

    def _fail_handles(self, handles: Iterable[RequestHandle], exc: BaseException) -> None:
        for h in handles:
            h._finish(error=exc, state=RequestState.FAILED)

    # --- the engine thread -------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.pipe.load()
            model = self.pipe.model
            budget = resolve_budget(self.kv_budget, model.device)
            self._pool = KVPool(
                model.config, model.dtype, model.device, budget_bytes=budget, max_num_seqs=self.max_num_seqs
            )
            self._scheduler = Scheduler(
                self._pool,
                policy=self.scheduling,
                max_num_batched_tokens=self.max_num_batched_tokens,
                static_wait=self.static_wait,
            )
            self._sampler = Sampler(model.config.vocab_size, model.device)
            fixed = model.device.type == "cuda" if self.cuda_graphs is None else bool(self.cuda_graphs)
            self._runner = DecodeRunner(model, self._pool, fixed_shape=fixed)
            self._worker.start()
        except BaseException as exc:  # reported by wait_ready and every request
            logger.exception("the engine failed to load the pipeline")
            self.load_error = exc
            self.ready.set()
            return
        self.ready.set()
        sched = self._scheduler
        try:
            while True:
                with self._cond:
                    while not self._stopping and not sched.running and not self._cancelled:
                        if not sched.waiting:
                            self._cond.wait()
                            continue
                        delay = sched.wait_hint(time.perf_counter())  # static: an empty batch waits for companions
                        if delay is None:
                            break
                        self._cond.wait(delay)
                    if self._stopping:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted = sched.schedule()
                    self._cond.notify_all()  # room for the perception worker
                self._drop_cancelled(cancelled)
                for prepared in admitted:
                    self._admit(prepared)
                if admitted:
                    for fn in self.admission_listeners:
                        fn(len(admitted), len(sched.running))
                if sched.running:
                    self._decode_step()
                else:
                    if not sched.waiting:
                        self._pool.release_memory()
                    self._notify(None)  # the batch emptied without a decoding step (e.g. cancelled rows)
        except BaseException as exc:  # a bug or a device failure: fail every request rather than hang
            logger.exception("the engine loop failed")
            self.load_error = exc
            self._fail_handles([r.handle for r in sched.running], EngineError(f"the engine failed: {exc}"))
        finally:
            error = EngineError("the engine stopped before this request finished")
            self._fail_handles([r.handle for r in sched.running], error)
            for prepared in list(sched.waiting):
                self._fail_handles(prepared.handles, error)

    def _drop_cancelled(self, cancelled: set[RequestHandle]) -> None:
        if not cancelled:
            return
        sched = self._scheduler
        for prepared in list(sched.waiting):
            if all(h in cancelled or h.done() for h in prepared.handles):
                sched.drop(prepared)
        slots = [row.slot for row in sched.running if row.handle in cancelled]
        if slots:
            sched.retire(slots)

    # --- admission: vision, compressor, prefill -----------------------------------------------------------------
    def _admit(self, prepared: PreparedRequest) -> None:
        live = [h for h in prepared.handles if not h.done()]
        if not live:
            return
        pool, model = self._pool, self.pipe.model
        slots = [pool.allocate(prepared.reserve) for _ in live]
        admitted = time.perf_counter()
        try:
            logits, timings = self._prefill(prepared, slots[0])
            for slot in slots[1:]:
                pool.copy_row(slots[0], slot)
            rows = [self._new_row(prepared, h, slot, timings, admitted) for h, slot in zip(live, slots)]
        except Exception as exc:
            pool.free(slots)  # the last slots: nothing else moves
            self._fail_handles(live, exc)
            return
        self._scheduler.running.extend(rows)
        tokens, records = self._sampler(logits.expand(len(rows), -1), rows)
        self._advance(rows, tokens, records, model)

    @torch.inference_mode()
    def _prefill(self, prepared: PreparedRequest, slot: int) -> tuple[torch.Tensor, dict[str, float]]:
        model = self.pipe.model
        device = model.device
        inputs = prepared.prepared.inputs.to(device)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        image_features = model.encode_images(inputs.pixel_values)
        synchronize(device)
        t1 = time.perf_counter()
        aux_embeds, aux_mask = model.build_aux_embeds(
            inputs.aux_input_ids, inputs.panoptic_pixel_values, inputs.aux_attention_mask
        )
        compressed = model.compress(aux_embeds, aux_mask).to(image_features.dtype)
        synchronize(device)
        t2 = time.perf_counter()
        cache = self._pool.row_cache(slot)
        out = model(
            inputs.input_ids,
            attention_mask=inputs.attention_mask,
            im_mask=inputs.im_mask,
            lang_mask=inputs.lang_mask,
            image_features=image_features,
            compressed_aux=compressed,
            cache=cache,
            last_logits_only=True,
        )
        logits = out.logits[:, -1].float()
        synchronize(device)
        self._pool.lengths[slot] = cache.length
        timings.update(vision=t1 - t0, compression=t2 - t1, prefill=time.perf_counter() - t2)
        return logits, timings

    def _new_row(
        self, prepared: PreparedRequest, handle: RequestHandle, slot: int, timings: dict[str, float], admitted: float
    ) -> Row:
        request = prepared.request
        settings = request.settings
        if handle.index and settings.seed is not None:  # choice j of n: its own seed
            settings = GenerationSettings.from_any(settings, seed=(settings.seed + handle.index) % 2**63)
        model = self.pipe.model
        device = model.device
        seen = None
        if settings.repetition_penalty != 1.0:
            inputs = prepared.prepared.inputs
            seen = seen_from_prompt(
                inputs.input_ids.to(device), inputs.attention_mask.to(device), model.config.vocab_size
            )[0]
        eos = eos_ids(settings, model.config.eos_token_id)
        handle.state = RequestState.RUNNING
        return Row(
            handle=handle,
            prepared=prepared,
            settings=settings,
            slot=slot,
            stop=StopCriteria(eos, settings.max_new_tokens, settings.stop, self._decode_ids),
            stream=AnswerStream(self._decode_ids, settings.stop),
            generator=row_generator(settings, device),
            seen=seen,
            constraint=request.constraint,
            logprobs=request.logprobs,
            timings={**prepared.timings, **timings, "queue": admitted - request.arrived},
            admitted=admitted,
        )

    # --- decoding ------------------------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        sched, pool, model = self._scheduler, self._pool, self.pipe.model
        rows = sched.running
        t0 = time.perf_counter()
        logits = self._runner([r.tokens[-1] for r in rows], list(pool.lengths))
        for i in range(len(rows)):
            pool.lengths[i] += 1
        new, records = self._sampler(logits, rows)
        self._advance(list(rows), new, records, model)
        seconds = time.perf_counter() - t0
        self._steps += 1
        self._step_times.append(seconds)
        self._notify(seconds)
        if not sched.running:
            self._notify(None)

    def _notify(self, seconds: Optional[float]) -> None:
        if self.listeners:
            stats = self.stats()
            for listener in self.listeners:
                listener(seconds, stats)

    def _advance(self, rows: list[Row], tokens: list[int], records: list[Any], model: Any) -> None:
        """Append each row's new token, stream it, retire the rows that ended."""
        now = time.perf_counter()
        ended: list[Row] = []
        for row, token, record in zip(rows, tokens, records):
            row.tokens.append(int(token))
            row.token_times.append(now - row.handle.request.arrived)
            if record is not None:
                row.token_logprobs.append(record)
            piece = row.stream.push(int(token))
            row.handle._piece(piece)
            callback = row.handle.request.on_token
            if callback is not None:
                try:
                    callback(int(token), piece)
                except Exception as exc:  # the caller's hook failed: that request ends with its error
                    row.finish_reason = "error"
                    row.handle._finish(error=exc, state=RequestState.FAILED)
                    ended.append(row)
                    continue
            reason = row.stop.check(row.tokens, row.constraint)
            if reason is not None:
                row.finish_reason = reason
                ended.append(row)
        if not ended:
            return
        for row in ended:
            if not row.handle.done():
                self._finish_row(row, now)
        self._scheduler.retire([row.slot for row in ended])

    def _finish_row(self, row: Row, now: float) -> None:
        request, inputs = row.handle.request, row.prepared.prepared.inputs
        text = cut_answer(self._decode_ids(row.tokens), row.settings.stop)
        prompt = int(inputs.attention_mask[0].sum()) - 1
        image = int(inputs.num_image_tokens)
        counts = {
            "prompt": prompt,
            "image": image,
            "aux": int(inputs.aux_attention_mask[0].sum()),
            "generated": len(row.tokens),
            "context": prompt + image,
        }
        timings = dict(row.timings)
        timings["decode"] = now - row.admitted - timings.get("vision", 0) - timings.get("compression", 0)
        timings["decode"] -= timings.get("prefill", 0)
        timings["total"] = now - request.arrived
        prep = row.prepared.prepared
        result = MoAIResult(
            text=text,
            prompt=prep.prompts[0],
            perception=prep.perceptions[0],
            aux_text=prep.aux_texts[0],
            token_counts=counts,
            timings=timings,
            model_id=self.pipe.model_id,
            revision=self.pipe.model.load_info.get("revision") or self.pipe.revision,
            seed=row.settings.seed,
            generation=row.settings.to_dict(),
            new_token_ids=list(row.tokens),
        )
        reason = "stop" if row.finish_reason == "stop" else "length"
        if reason == "length" and len(text) < len(self._decode_ids(row.tokens)):
            reason = "stop"  # the answer was cut at the chat marker
        row.handle.output = RequestOutput(
            finish_reason=reason,
            token_ids=list(row.tokens),
            logprobs=list(row.token_logprobs) if row.logprobs is not None else None,
            first_token_s=row.token_times[0] if row.token_times else None,
            token_times=list(row.token_times),
        )
        row.handle._finish(result=result, tail=row.stream.finish(text))

    def _decode_ids(self, ids: Sequence[int]) -> str:
        return self.pipe.tokenizer.decode(list(ids), skip_special_tokens=True, keep_chat_markers=True)


__all__ = ["MoAIEngine", "EngineStats", "StepListener"]
