"""The OpenAI chat-completions wire format, as far as MoAI can honour it.

Requests are validated here (Pydantic v2, unknown fields refused) and turned into what the pipeline needs: one
prompt, one image reference and a :class:`~moai_sdk.modeling.GenerationSettings`. Responses and stream chunks are
built as plain dicts in OpenAI's shapes (``chat.completion`` / ``chat.completion.chunk``), and every error is an
:class:`APIError` rendered as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status.

What MoAI cannot do is refused with a 400 that says so instead of being silently ignored: several images, several
turns or a system prompt (MoAI's chat template brings its own), tools / functions, presence / frequency penalties
and logit biases. Fields that do not change the answer (``user``, ``metadata``, ``store``, ``service_tier``) are
accepted and ignored; so are top-level fields this server does not know (newer SDKs add fields over time, and vLLM
ignores them too), with one logged warning per field name.

Outputs: ``logprobs`` / ``top_logprobs`` (0..20) in OpenAI's shape; ``n`` choices (1..16) from one perception and
one prefill, choice ``i`` sampled with ``seed + i``; structured answers with OpenAI's ``response_format``
(``json_object``, ``json_schema`` -- ``strict`` or not, the schema is always enforced) or vLLM's
``structured_outputs`` extension (``{"choice" | "regex" | "json" | "grammar": ...}`` or ``"json_object": true``),
compiled by :mod:`moai_sdk.structured`. ``seed`` takes any int64 (as vLLM); a negative seed is used modulo 2**64.

Sampling: ``temperature == 0`` means greedy decoding (as in vLLM); a positive temperature samples with it; an
absent ``temperature`` keeps the pipeline's own default (``pipe.generation_config``), and so do the other absent
fields. ``top_k`` and ``repetition_penalty`` are accepted as extensions (vLLM's names).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GenerationError
from ..modeling.generation import GenerationSettings

logger = logging.getLogger(__name__)

#: ``seed`` bounds (int64, as vLLM); a negative seed is used modulo 2**64 (torch's seed range).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
#: Most choices (``n``) and alternatives (``top_logprobs``) per request.
MAX_N = 16
MAX_TOP_LOGPROBS = 20
#: vLLM's ``structured_outputs`` keys this server honours, and the ones it refuses by name.
STRUCTURED_KEYS = ("choice", "regex", "json", "grammar", "json_object")
STRUCTURED_UNSUPPORTED = ("structural_tag", "whitespace_pattern")

_warned_fields: set[str] = set()
_warned_lock = threading.Lock()


def warn_unknown_fields(names: Sequence[str]) -> None:
    """Log one warning per unknown top-level field name (per process), then ignore it."""
    with _warned_lock:
        new = [n for n in names if n not in _warned_fields]
        _warned_fields.update(new)
    for name in new:
        logger.warning("ignoring the unknown request field %r (warned once per field name)", name)


#: OpenAI's error ``type`` for each status this server returns.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}

#: At most this many stop strings (OpenAI's limit).
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: ``status`` (HTTP), ``message``, ``param`` (the offending field),
    ``code`` (a short machine-readable reason) and extra response ``headers`` (``Retry-After`` on 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI sends it."""
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name; refused below when true


class MoAIOptions(_Strict):
    """The ``moai`` extension object (send it with the openai client's ``extra_body={"moai": {...}}``)."""

    return_perception: bool = Field(
        default=False, description="add a 'moai' object: verbalization, perception JSON, stage timings"
    )


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's fields MoAI understands, plus the ones it refuses by name; other
    top-level fields are kept in ``model_extra`` and ignored (:func:`warn_unknown_fields`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = Field(default=None, ge=1, le=MAX_N)
    structured_outputs: Optional[dict[str, Any]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    moai: Optional[MoAIOptions] = None
    # accepted and ignored: they do not change the answer
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # refused unless neutral (see check_unsupported)
    best_of: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    reasoning_effort: Optional[Any] = None
    web_search_options: Optional[Any] = None


class PerceiveRequest(_Strict):
    """``POST /v1/perceive`` (extension): the experts only, answered with the ``PerceptionResult`` JSON."""

    image: str = Field(description="a data: URL, bare base64, or an http(s) URL (with --allow-remote-images)")
    experts: Optional[list[str]] = Field(default=None, description="configured expert names or tasks; all if absent")
    include_masks: bool = Field(default=False, description="include masks as COCO RLE")


def check_unsupported(req: ChatCompletionRequest) -> None:
    """Refuse, by name, what MoAI cannot do (400)."""
    if req.model_extra:
        warn_unknown_fields(sorted(req.model_extra))
    if req.tools or req.functions or req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        param = "tools" if req.tools or req.tool_choice not in (None, "none") else "functions"
        raise bad_request("tools / function calling are not supported by MoAI", param)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(
                f"{name} is not supported by MoAI; use the repetition_penalty extension (extra_body) instead", name
            )
    if req.best_of not in (None, 1):
        raise bad_request("best_of is not supported by this server; use n", "best_of", "unsupported_field")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported by this server", "logit_bias")
    if req.modalities is not None and list(req.modalities) != ["text"]:
        raise bad_request("MoAI answers in text only: modalities must be ['text']", "modalities")
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported by MoAI", name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream=true", "stream_options")
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise bad_request("continuous_usage_stats is not supported; use include_usage", "stream_options")


def parse_messages(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """The one user turn: ``(prompt text, image URL)``. The content is a list of parts -- ``text`` parts (joined
    with newlines) and exactly one ``image_url`` part."""
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise bad_request(
            f"MoAI answers exactly one user message (text plus one image); got roles {roles}. Several turns and "
            "system / developer messages are not supported (MoAI's chat template has its own system prompt)",
            "messages",
        )
    message = messages[0]
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise bad_request(f"unsupported field(s) {sorted(extra)} in the user message", "messages[0]")
    content = message.get("content")
    if isinstance(content, str) or content is None:
        raise bad_request(
            "MoAI needs an image: send the content as a list with a 'text' part and one 'image_url' part",
            "messages[0].content",
        )
    if not isinstance(content, list):
        raise bad_request("message content must be a string or a list of parts", "messages[0].content")
    texts: list[str] = []
    images: list[str] = []
    for i, part in enumerate(content):
        where = f"messages[0].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else None
            if not isinstance(url, str) or not url:  # a bare string is refused, as in vLLM and OpenAI
                raise bad_request("an image_url part needs an object {'url': ...}, not a bare string", where)
            images.append(url)
        else:
            raise bad_request(f"unsupported content part {kind!r}: MoAI reads 'text' parts and one 'image_url'", where)
    if len(images) != 1:
        raise bad_request(f"MoAI answers about exactly one image per request; got {len(images)}", "messages[0].content")
    prompt = "\n".join(texts)
    if not prompt.strip():
        raise bad_request("the user message has no text: add a 'text' part with the question", "messages[0].content")
    return prompt, images[0]


def stop_list(stop: Union[str, list[str], None]) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise bad_request(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    return stops


def generation_settings(req: ChatCompletionRequest, defaults: GenerationSettings) -> GenerationSettings:
    """The request's settings over the pipeline's defaults; ``max_new_tokens`` is the requested maximum (or the
    default). ``temperature == 0`` is greedy, ``> 0`` samples with it, absent keeps the default."""
    values = defaults.to_dict()
    maximum = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if maximum is not None:
        values["max_new_tokens"] = maximum
    if req.temperature is not None:
        values["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            values["temperature"] = req.temperature
    for name in ("top_p", "top_k", "repetition_penalty"):
        if getattr(req, name) is not None:
            values[name] = getattr(req, name)
    if req.seed is not None:
        values["seed"] = req.seed % 2**64  # any int64, as vLLM; torch seeds are 0..2**64-1
    if req.stop is not None:
        values["stop"] = stop_list(req.stop)
    try:
        settings = GenerationSettings.from_any(values)
    except GenerationError as exc:
        raise bad_request(str(exc)) from exc
    if req.stream and settings.num_beams > 1:
        raise bad_request("beam search (the server's default num_beams > 1) cannot stream; use stream=false", "stream")
    return settings


@dataclass(frozen=True)
class OutputOptions:
    """What a request asks of its outputs: ``n`` choices, ``logprobs`` (K alternatives, None = off) and a
    ``response_format`` for :mod:`moai_sdk.structured` (None = free text); ``key`` says which requests may share
    a pipeline call."""

    n: int = 1
    logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None

    @property
    def key(self) -> tuple:
        import json

        fmt = None if self.response_format is None else json.dumps(self.response_format, sort_keys=True)
        return (self.n, self.logprobs, fmt)


def output_options(req: ChatCompletionRequest) -> OutputOptions:
    """``n``, ``logprobs`` / ``top_logprobs`` and the structured-output request (OpenAI's ``response_format`` or
    vLLM's ``structured_outputs``, not both) of a request."""
    k = None
    if req.logprobs:
        k = int(req.top_logprobs or 0)
    fmt = None
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_schema":
            inner = rf.get("json_schema")
            if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
                raise bad_request("response_format json_schema needs {'name': ..., 'schema': {...}}", "response_format")
            fmt = {"type": "json_schema", "json_schema": {"schema": inner.get("schema", {})}}
        elif kind == "json_object":
            fmt = {"type": "json_object"}
        elif kind != "text":
            raise bad_request(
                f"response_format type must be 'text', 'json_object' or 'json_schema'; got {kind!r}", "response_format"
            )
    so = req.structured_outputs
    if so:
        if fmt is not None:
            raise bad_request("send either response_format or structured_outputs, not both", "structured_outputs")
        refused = [k for k in STRUCTURED_UNSUPPORTED if so.get(k) is not None]
        if refused:
            raise bad_request(f"structured_outputs {refused[0]} is not supported by this server", "structured_outputs")
        given = {k: v for k, v in so.items() if k in STRUCTURED_KEYS and v not in (None, False)}
        others = sorted(set(so) - set(STRUCTURED_KEYS))
        if others:
            logger.info("structured_outputs: ignoring the backend options %s", others)
        if len(given) != 1:
            raise bad_request(
                f"structured_outputs takes exactly one of {list(STRUCTURED_KEYS)}; got {sorted(given)}",
                "structured_outputs",
            )
        ((name, value),) = given.items()
        fmt = {"type": "json_object"} if name == "json_object" else {name: value}
    return OutputOptions(int(req.n or 1), k, fmt)


def logprobs_content(entries: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` list of :class:`~moai_sdk.results.TokenLogprob` entries."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top_logprobs],
        }
        for e in entries
    ]


# ----------------------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "total_tokens": int(prompt_tokens) + int(completion_tokens),
    }


def _header(cid: str, kind: str, created: int, model: str) -> dict[str, Any]:
    """The keys every chat-completion object and chunk starts with."""
    return {"id": cid, "object": kind, "created": created, "model": model}


def completion(
    cid: str,
    model: str,
    created: int,
    text: Union[str, Sequence[tuple[str, str, Optional[list]]]],
    finish_reason: Optional[str],
    use: dict[str, int],
    moai: Optional[dict],
) -> dict[str, Any]:
    """A ``chat.completion`` object: one answer ``text`` and its ``finish_reason``, or a sequence of choices
    ``(text, finish_reason, logprobs content or None)``."""
    choices = [(text, finish_reason, None)] if isinstance(text, str) else list(text)
    body: dict[str, Any] = {
        **_header(cid, "chat.completion", created, model),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": t, "refusal": None},
                "logprobs": None if lp is None else {"content": lp, "refusal": None},
                "finish_reason": reason,
            }
            for i, (t, reason, lp) in enumerate(choices)
        ],
        "usage": use,
        "system_fingerprint": None,
    }
    if moai is not None:
        body["moai"] = moai
    return body


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: Optional[dict[str, Any]],
    finish_reason: Optional[str] = None,
    *,
    include_usage: bool = False,
    use: Optional[dict[str, int]] = None,
    moai: Optional[dict] = None,
    index: int = 0,
    logprobs: Optional[list] = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` of choice ``index``; ``delta=None`` gives the usage-only chunk with no choices;
    ``logprobs``: the ``logprobs.content`` entries of the tokens this chunk carries."""
    lp = None if logprobs is None else {"content": logprobs, "refusal": None}
    body: dict[str, Any] = {
        **_header(cid, "chat.completion.chunk", created, model),
        "choices": []
        if delta is None
        else [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
        "system_fingerprint": None,
    }
    if include_usage:
        body["usage"] = use
    if moai is not None:
        body["moai"] = moai
    return body


def model_card(name: str, created: Optional[int] = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created or time.time()), "owned_by": "moai-sdk"}
