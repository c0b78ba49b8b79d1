"""The ASGI app: OpenAI-compatible chat completions over MoAI's continuous-batching engine.

``create_app(pipe, ...)`` returns a FastAPI app (usable in your own ASGI stack; ``moai serve`` runs it under
uvicorn). Endpoints:

* ``POST /v1/chat/completions`` -- OpenAI's chat completions (one user turn: text + one image), streamed as
  server-sent events with ``stream=true`` (``data: {chunk}`` lines, then ``data: [DONE]``);
* ``GET /v1/models`` -- the one served model;
* ``POST /v1/perceive`` (extension) -- the perception experts only: the ``PerceptionResult`` JSON;
* ``GET /health`` -- 200 ``{"status": "ok"}`` once the model is loaded, 503 before (or when loading failed);
* ``GET /metrics`` -- Prometheus text format (:mod:`moai_sdk.serve.metrics`).

With an API key, the ``/v1`` endpoints need ``Authorization: Bearer <key>`` (401 otherwise); ``/health`` and
``/metrics`` stay open for probes. Errors are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 bad input, 401 bad key, 404 unknown model, 413 body too large, 429 queue full (``Retry-After``),
503 not ready, 504 ``request_timeout`` exceeded. A client that disconnects is dropped from the queue (or its
row discarded); it is logged as status 499 in the metrics.

``usage.prompt_tokens`` counts what the language model sees: the text tokens of the templated prompt, the image
positions (1225 for MoAI-7B) and the auxiliary tokens -- the compressed tokens the MoAI-Mixer reads, i.e. the
compressor's latents (64 for MoAI-7B), not the (longer) verbalization the compressor consumed.
``completion_tokens`` counts generated tokens (EOS included when produced).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Union

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, DependencyError, InputError
from ..pipeline import MoAIPipeline
from .engine_scheduler import EngineScheduler
from .images import load_request_image
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    PerceiveRequest,
    bad_request,
    check_unsupported,
    chunk,
    completion,
    completion_id,
    generation_settings,
    logprobs_content,
    model_card,
    output_options,
    parse_messages,
    usage,
)
from .scheduler import Answer, Job

logger = logging.getLogger(__name__)

#: Seconds between checks whether a waiting client is still connected.
DISCONNECT_POLL_S = 0.25
_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/perceive", "/health", "/metrics")


@dataclass(frozen=True)
class ServeConfig:
    """Server settings (``moai serve`` flags of the same names)."""

    served_model_name: Optional[str] = None  #: the ``model`` clients send; default: the pipeline's model id
    max_batch_size: int = 8  #: rows per pipeline call (1 = no batching)
    batch_timeout_ms: float = 50.0  #: how long a batch waits for companions (after its oldest request or the last call)
    max_queue: int = 64  #: waiting requests before 429
    request_timeout: float = 600.0  #: seconds from arrival to the end of the answer before 504
    api_key: Optional[str] = field(default=None, repr=False)  #: Bearer key for /v1 (None = open)
    allow_remote_images: bool = False  #: fetch http(s) image URLs (off: data: URLs only)
    max_image_bytes: int = 20 * 2**20  #: largest encoded image
    max_body_bytes: Optional[int] = None  #: largest request body; default: the base64 image plus 1 MiB
    remote_timeout: float = 10.0  #: seconds for a remote image fetch
    scheduling: str = "continuous"  #: "continuous" (rows join/leave every step) or "static" (request-level)
    max_num_seqs: Optional[int] = None  #: rows decoding together; default: max_batch_size
    kv_budget: Union[int, float, None] = None  #: KV pool bytes, or a fraction of free CUDA memory
    max_num_batched_tokens: int = 4096  #: per-step token budget (decode rows + newcomers' prefill)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1; got {self.max_batch_size}")
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be >= 1; got {self.max_queue}")
        if self.batch_timeout_ms < 0 or self.request_timeout <= 0 or self.max_image_bytes < 1:
            raise ConfigError("batch_timeout_ms must be >= 0, request_timeout > 0 and max_image_bytes >= 1")
        if self.scheduling not in ("continuous", "static"):
            raise ConfigError(f"scheduling must be 'continuous' or 'static'; got {self.scheduling!r}")
        if self.api_key is not None and not self.api_key:
            raise ConfigError("api_key must not be empty (omit it for an open server)")

    @property
    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return int(self.max_body_bytes)
        return math.ceil(self.max_image_bytes * 4 / 3) + 2**20


class _BodyTooLarge(Exception):
    pass


class _Observe:
    """Pure ASGI middleware: the body-size limit (413) and per-request metrics (status, latency)."""

    def __init__(self, app: Any, limit: int, metrics: ServerMetrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope.get("path", "")
        endpoint = path if path in _ROUTES else "other"
        status = {"code": 0, "done": False}

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True

        length = dict(scope.get("headers") or []).get(b"content-length")
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                await _send_error(observed_send, _too_large(self.limit))
                return
            await self.app(scope, limited_receive, observed_send)
        except _BodyTooLarge:
            if not status["code"]:
                await _send_error(observed_send, _too_large(self.limit))
        except Exception:  # answered 500 by the server's outer error handler
            status.update(code=500, done=True)
            raise
        finally:  # a response that never finished (the client left mid-stream) counts as 499
            self.metrics.answered(endpoint, status["code"] if status["done"] else 499, time.perf_counter() - t0)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes", code="body_too_large")


async def _send_error(send: Any, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return bad_request(f"unsupported field {param!r}: this server does not know it", param, "unsupported_field")
    messages = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors)
    return bad_request(f"invalid request: {messages}", param, "invalid_request")


def create_app(pipe: MoAIPipeline, config: Optional[ServeConfig] = None, **options: Any) -> FastAPI:
    """A FastAPI app serving ``pipe`` on the continuous-batching engine (:mod:`moai_sdk.engine`, through
    :class:`~moai_sdk.serve.engine_scheduler.EngineScheduler`); ``options`` are :class:`ServeConfig` fields.

    The model thread starts (and loads the pipeline) with the app's lifespan, or on the first request when the
    app is mounted where lifespans do not run; ``/health`` says when it is ready.
    """
    if config is None:
        config = ServeConfig(**options)
    elif options:
        config = ServeConfig(**{**config.__dict__, **options})
    metrics = ServerMetrics()
    served = config.served_model_name or pipe.model_id
    scheduler = EngineScheduler(
        pipe,
        scheduling=config.scheduling,
        max_num_seqs=config.max_num_seqs or config.max_batch_size,
        kv_budget=config.kv_budget,
        max_num_batched_tokens=config.max_num_batched_tokens,
        batch_timeout=config.batch_timeout_ms / 1000.0,
        max_queue=config.max_queue,
        metrics=metrics,
        served_name=served,
    )
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="MoAI (OpenAI-compatible)", version="1", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.config = config
    app.state.metrics = metrics
    app.add_middleware(_Observe, limit=config.body_limit, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail), code="http_error"))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def ready() -> EngineScheduler:
        scheduler.start()
        if scheduler.load_error is not None:
            raise APIError(503, f"the model failed to load: {scheduler.load_error}", code="load_failed")
        if not scheduler.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly (GET /health)", code="loading")
        return scheduler

    async def request_image(ref: str, param: str, **extra: Any) -> torch.Tensor:
        """The image a request refers to, within this server's size / remote-fetch policy."""
        return await load_request_image(
            ref,
            param=param,
            max_bytes=config.max_image_bytes,
            allow_remote=config.allow_remote_images,
            remote_timeout=config.remote_timeout,
            **extra,
        )

    async def next_event(job: Job, request: Optional[Request], deadline: float) -> tuple[str, Any]:
        """The job's next event; 504 past ``deadline``; 499 (no body) when the client left meanwhile."""
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                if scheduler.cancel(job):
                    raise APIError(
                        504,
                        f"the request did not complete within {config.request_timeout:g}s (--request-timeout)",
                        code="timeout",
                    )
                deadline = math.inf  # the answer was already posted: deliver it rather than a 504
                continue
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(DISCONNECT_POLL_S, remaining))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    if scheduler.cancel(job):
                        raise _ClientGone() from None

    @app.get("/health")
    async def health() -> JSONResponse:
        if scheduler.load_error is not None:
            return JSONResponse({"status": "error", "error": str(scheduler.load_error)}, status_code=503)
        if not scheduler.ready.is_set():
            scheduler.start()
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": served, "queue_depth": scheduler.queue_depth})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card(served, created)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict:
        if model_id != served:
            raise APIError(
                404, f"the model {model_id!r} is not served here; this server serves {served!r}", code="model_not_found"
            )
        return model_card(served, created)

    def choice_logprobs(result: Any, sched: EngineScheduler) -> list:
        """OpenAI's ``logprobs.content`` of an answer's tokens (the closing EOS has no text and is left out)."""
        entries = list(result.logprobs or [])
        if entries and result.new_token_ids and result.new_token_ids[-1] == sched.info.eos_token_id:
            entries = entries[:-1]
        return logprobs_content(entries)

    @app.post("/v1/perceive", dependencies=[Depends(authorize)])
    async def perceive(body: PerceiveRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        sched = ready()
        sched.check_capacity()
        with sched.preparing():
            image = await request_image(body.image, "image", allow_bare_base64=True)
            job = Job("perceive", image, asyncio.get_running_loop(), experts=body.experts)
            sched.submit(job)
        try:
            kind, payload = await next_event(job, request, arrived + config.request_timeout)
        except _ClientGone:
            return Response(status_code=499)
        if kind == "error":
            raise payload
        return Response(payload.to_json(include_masks=body.include_masks), media_type="application/json")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        sched = ready()
        sched.check_capacity()  # refuse before spending work on the image when the queue is full
        if body.model != served:
            raise APIError(
                404,
                f"the model {body.model!r} is not served here; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        check_unsupported(body)
        prompt, image_ref = parse_messages(body.messages)
        settings = generation_settings(body, pipe.generation_config)
        outputs = output_options(body)
        if outputs.response_format is not None:  # a schema the engine cannot compile is the client's 400
            try:
                await run_in_threadpool(pipe.structured.compile, outputs.response_format)
            except (InputError, DependencyError) as exc:
                param = "structured_outputs" if body.structured_outputs else "response_format"
                raise bad_request(str(exc), param, code=type(exc).__name__) from exc
        if (outputs.n > 1 or outputs.logprobs is not None or outputs.response_format) and settings.num_beams > 1:
            raise bad_request(
                "n, logprobs and structured outputs need greedy or sampling decoding; this server's default is "
                "beam search -- send a temperature",
                "n" if outputs.n > 1 else "logprobs" if outputs.logprobs is not None else "response_format",
            )
        with sched.preparing():
            image = await request_image(image_ref, "messages[0].content")
            requested = body.max_completion_tokens is not None or body.max_tokens is not None
            context = await run_in_threadpool(sched.context_tokens, prompt)
            settings = _fit_context(settings, context, sched.info.max_context, requested)
            loop = asyncio.get_running_loop()
            job = Job("chat", image, loop, prompt=prompt, settings=settings, stream=bool(body.stream), outputs=outputs)
            sched.submit(job)
        deadline = arrived + config.request_timeout
        cid, created_at = completion_id(), int(time.time())
        want_moai = body.moai is not None and body.moai.return_perception
        try:
            first = await next_event(job, request, deadline)
        except _ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        if not body.stream:
            answer: Answer = first[1]
            use = _usage(answer, sched)
            metrics.prompt_tokens.inc(use["prompt_tokens"])
            metrics.generated_tokens.inc(use["completion_tokens"])
            moai = _moai_extension(answer) if want_moai else None
            choices = [
                (r.text, reason, choice_logprobs(r, sched) if outputs.logprobs is not None else None)
                for r, reason in answer.choices
            ]
            return JSONResponse(completion(cid, served, created_at, choices, None, use, moai))
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(job, first, cid, served, created_at, include_usage, want_moai, deadline, outputs)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _sse(
        job: Job,
        first: tuple[str, Any],
        cid: str,
        model: str,
        created_at: int,
        include_usage: bool,
        want_moai: bool,
        deadline: float,
        outputs: Any,
    ) -> AsyncIterator[str]:
        """Server-sent events of one streaming job: role, text pieces, the finish chunk, usage, ``[DONE]``.

        With ``logprobs`` the text streams as it is generated and the tokens' log-probabilities follow in one
        chunk before the finish chunk; with ``n`` > 1 each choice arrives whole (its text and log-probabilities in
        one chunk, then its finish chunk), once all are generated."""
        ended = False

        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield data(chunk(cid, model, created_at, {"role": "assistant", "content": ""}, include_usage=include_usage))
            event = first
            while True:
                kind, payload = event
                if kind == "delta":
                    yield data(chunk(cid, model, created_at, {"content": payload}, include_usage=include_usage))
                elif kind == "result":
                    ended = True
                    answer: Answer = payload
                    use = _usage(answer, scheduler)
                    metrics.prompt_tokens.inc(use["prompt_tokens"])
                    metrics.generated_tokens.inc(use["completion_tokens"])
                    moai = _moai_extension(answer) if want_moai else None
                    for i, (result, reason) in enumerate(answer.choices):
                        lp = choice_logprobs(result, scheduler) if outputs.logprobs is not None else None
                        if outputs.n > 1:
                            delta = {"role": "assistant", "content": result.text} if i else {"content": result.text}
                            yield data(
                                chunk(cid, model, created_at, delta, index=i, logprobs=lp, include_usage=include_usage)
                            )
                        elif lp is not None:
                            yield data(chunk(cid, model, created_at, {}, logprobs=lp, include_usage=include_usage))
                        last = i == len(answer.choices) - 1
                        finish = chunk(
                            cid,
                            model,
                            created_at,
                            {},
                            reason,
                            include_usage=include_usage,
                            moai=moai if last else None,
                            index=i,
                        )
                        yield data(finish)
                    if include_usage:
                        yield data(chunk(cid, model, created_at, None, include_usage=True, use=use))
                    yield "data: [DONE]\n\n"
                    return
                else:
                    ended = True
                    yield data(payload.body())
                    return
                try:
                    event = await next_event(job, None, deadline)
                except APIError as exc:  # 504 after the stream began: an error event ends it
                    event = ("error", exc)
        finally:
            if not ended:  # the client went away (the response was cancelled): drop its row
                scheduler.cancel(job)

    return app


class _ClientGone(Exception):
    """The client disconnected while its request waited."""


def _fit_context(settings: Any, context: int, max_context: int, requested: bool) -> Any:
    """Refuse (400) a prompt that leaves no room to answer, or a requested maximum beyond the context;
    an unrequested default maximum is shortened to fit."""
    room = max_context - context
    if room < 1 or (requested and settings.max_new_tokens > room):
        raise APIError(
            400,
            f"this model's maximum context length is {max_context} tokens; the prompt takes {context} (text and "
            f"image) and {settings.max_new_tokens} were requested for the answer. Shorten the prompt or lower "
            "max_tokens",
            param="max_tokens" if room >= 1 else "messages",
            code="context_length_exceeded",
        )
    if settings.max_new_tokens > room:
        settings.max_new_tokens = room
    return settings


def _usage(answer: Answer, scheduler: EngineScheduler) -> dict[str, int]:
    counts = answer.result.token_counts
    prompt_tokens = int(counts.get("context", 0)) + scheduler.info.aux_tokens
    results = [r for r, _ in answer.choices] or [answer.result]
    return usage(prompt_tokens, sum(len(r.new_token_ids) for r in results))


def _moai_extension(answer: Answer) -> dict[str, Any]:
    result = answer.result
    perception = None if result.perception is None else json.loads(result.perception.to_json())
    return {
        "aux_text": result.aux_text,
        "perception": perception,
        "timings": result.timings,
        "token_counts": result.token_counts,
        "seed": result.seed,
        "batch_size": answer.batch_size,
    }
