"""What the playground runs, without any web framework: a pipeline in this process, or a ``moai serve`` server.

Both backends answer the same questions about one uploaded picture:

* :meth:`perceive` -- the perception experts' result, its picture and the words the model is told;
* :meth:`answer` -- the answer as text pieces while it is generated, then a :class:`Finished` (details, gates);
* :meth:`ablate` -- the answer without each expert (in process only: the server has no such endpoint).

:class:`LocalBackend` calls :meth:`MoAIPipeline.perceive <moai_sdk.pipeline.MoAIPipeline.perceive>`,
:meth:`~moai_sdk.pipeline.MoAIPipeline.stream` and :meth:`~moai_sdk.pipeline.MoAIPipeline.ablate`.
:class:`ServerBackend` posts to ``/v1/perceive`` and streams ``/v1/chat/completions`` (server-sent events) with
``httpx``. Every failure a user can cause or meet -- an unreadable or too large upload, an empty prompt, a
prompt that does not fit the context window, a server that is down or answers an error -- is a
:class:`~moai_sdk.errors.MoAIError` whose message the page shows.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from ..errors import ConfigError, InputError, MoAIError
from ..imageops import load_image_chw
from ..results import TASKS, PerceptionResult
from ..verbalization import verbalize

logger = logging.getLogger(__name__)

#: Largest upload the playground reads (encoded bytes), unless ``max_image_bytes`` says otherwise.
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
#: Upper bound of the "max new tokens" slider.
MAX_NEW_TOKENS_CAP = 1024


class ServerError(MoAIError):
    """The ``moai serve`` server could not be reached or answered an error."""


@dataclass(frozen=True)
class Upload:
    """One uploaded picture: its encoded bytes (sent to a server as they are) and the decoded uint8 CHW frame."""

    name: str
    data: bytes
    image: torch.Tensor

    @property
    def pil(self) -> Image.Image:
        return Image.fromarray(self.image[:3].permute(1, 2, 0).numpy())


def read_upload(
    path: Union[str, os.PathLike, None], *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, roots: Sequence[Path] = ()
) -> Upload:
    """Read and decode an uploaded picture; ``roots``: folders the file must lie in (the upload cache, the
    examples). Raises :class:`InputError` for a missing, too large or unreadable picture."""
    if path is None or not str(path):
        raise InputError("no picture: upload one (drop a file, paste, or pick an example), then ask")
    file = Path(path).resolve()
    if roots and not any(file.is_relative_to(Path(r).resolve()) for r in roots):
        raise InputError("the picture must be uploaded through the page")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise InputError(f"the uploaded picture cannot be read ({exc.strerror}); upload it again") from exc
    if size > max_bytes:
        raise InputError(
            f"the picture is {size / 2**20:.1f} MiB; this playground takes up to {max_bytes / 2**20:.1f} MiB "
            "(moai ui --max-image-bytes)"
        )
    data = file.read_bytes()
    try:
        image = load_image_chw(data)
    except InputError as exc:
        raise InputError(f"the uploaded file is not a picture that can be read: {exc}") from exc
    return Upload(name=file.name, data=data, image=image)


@dataclass(frozen=True)
class Settings:
    """The page's generation settings: greedy decoding when ``temperature`` is 0, sampling otherwise."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= int(self.max_new_tokens) <= MAX_NEW_TOKENS_CAP:
            raise InputError(f"max new tokens must be within 1..{MAX_NEW_TOKENS_CAP}; got {self.max_new_tokens}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise InputError(f"temperature must be within 0..2; got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InputError(f"top-p must be within (0, 1]; got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0

    def pipeline_options(self) -> dict[str, Any]:
        """The generation keywords of a pipeline call."""
        if self.greedy:
            return {"max_new_tokens": int(self.max_new_tokens), "do_sample": False}
        return {
            "max_new_tokens": int(self.max_new_tokens),
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
        }

    def request_fields(self) -> dict[str, Any]:
        """The same settings as OpenAI chat-completion fields (``temperature`` 0 is greedy there too)."""
        fields: dict[str, Any] = {"max_tokens": int(self.max_new_tokens), "temperature": float(self.temperature)}
        if not self.greedy:
            fields["top_p"] = float(self.top_p)
        return fields


def check_prompt(prompt: Optional[str]) -> str:
    if prompt is None or not prompt.strip():
        raise InputError("the question is empty: type what you want to know about the picture")
    return prompt


@dataclass
class Seen:
    """What the experts saw: the result (``None`` when no expert ran), its picture and the verbalization."""

    perception: Optional[PerceptionResult]
    picture: Optional[Image.Image]
    verbalization: str


@dataclass
class Finished:
    """The end of an answer: its full text, the details table and the gate plot (when the backend has one)."""

    text: str
    details: dict[str, Any] = field(default_factory=dict)
    gates: Optional[Image.Image] = None
    verbalization: Optional[str] = None


def _picture(perception: Optional[PerceptionResult], upload: Upload) -> Optional[Image.Image]:
    if perception is None:
        return None
    return perception.plot(upload.image)


def _rounded(timings: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in timings.items()}


class LocalBackend:
    """The playground on a :class:`~moai_sdk.pipeline.MoAIPipeline` in this process."""

    mode = "in-process"
    can_ablate = True

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def describe(self) -> str:
        return f"model `{self.pipe.model_id}` on {self.pipe.device}, in this process"

    def experts(self) -> list[tuple[str, str]]:
        """(label, task) of each configured expert, in verbalization order."""
        return [(f"{task}: {self.pipe.experts[task].name}", task) for task in TASKS if task in self.pipe.experts]

    def perceive(self, upload: Upload, experts: Sequence[str]) -> Seen:
        if not experts:
            return Seen(None, None, self.pipe.verbalize(None))
        perception = self.pipe.perceive(upload.image, experts=list(experts))
        return Seen(perception, _picture(perception, upload), self.pipe.verbalize(perception))

    def _options(self, seen: Seen, settings: Settings) -> dict[str, Any]:
        options = settings.pipeline_options()
        if seen.perception is None:
            options["experts"] = []
        else:
            options["perception"] = seen.perception
        return options

    def answer(self, upload: Upload, prompt: str, seen: Seen, settings: Settings) -> Iterator[Union[str, Finished]]:
        options = self._options(seen, settings)
        for piece in self.pipe.stream(upload.image, prompt, return_gates=True, **options):
            if isinstance(piece, str):
                yield piece
                continue
            gates = piece.plot_gates() if piece.mixer is not None and piece.mixer.layers else None
            details = {
                "token_counts": dict(piece.token_counts),
                "timings_s": _rounded(piece.timings),
                "generation": settings.pipeline_options(),
                "seed": piece.seed,
                "model": piece.model_id,
            }
            yield Finished(piece.text, details, gates)

    def ablate(self, upload: Upload, prompt: str, seen: Seen, settings: Settings) -> list[list[Any]]:
        if seen.perception is None:
            raise InputError("ablation removes one expert at a time: switch at least one expert on")
        tasks = [t for t in seen.perception.tasks]
        if not tasks:
            raise InputError("the experts found nothing in this picture, so there is nothing to remove")
        options = self._options(seen, settings)
        options.pop("experts", None)
        table = self.pipe.ablate(upload.image, prompt, experts=tasks, **options)
        return [
            [
                row.variant,
                "yes" if row.changed else "",
                row.token_counts.get("aux", 0),
                row.token_counts.get("generated", 0),
                row.text,
            ]
            for row in table.rows
        ]


class ServerBackend:
    """The playground on a running ``moai serve`` (its HTTP API only): ``/v1/perceive`` for the perception and a
    streamed ``/v1/chat/completions`` for the answer. The server answers with every expert it has; the page's
    expert switches choose what ``/v1/perceive`` runs and draws."""

    mode = "server"
    can_ablate = False

    def __init__(
        self, url: str, *, api_key: Optional[str] = None, model: Optional[str] = None, timeout: float = 600.0
    ) -> None:
        import httpx  # the serve / ui extras bring it

        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"--server must be an http(s) URL such as http://127.0.0.1:8000; got {url!r}")
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.base, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0))

    def describe(self) -> str:
        return f"the `moai serve` server at {self.base}"

    def experts(self) -> list[tuple[str, str]]:
        return [(task, task) for task in TASKS]

    def _error(self, exc: Exception) -> ServerError:
        if isinstance(exc, self._httpx.ConnectError):
            return ServerError(f"cannot reach the server at {self.base}: is `moai serve` running there? ({exc})")
        if isinstance(exc, self._httpx.TimeoutException):
            return ServerError(f"the server at {self.base} did not answer in time ({type(exc).__name__})")
        return ServerError(f"talking to the server at {self.base} failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _status_error(status: int, text: str) -> ServerError:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text.strip()[:300] or "no message"
        return ServerError(f"the server answered {status}: {message}")

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.client.post(path, json=body)
        except self._httpx.HTTPError as exc:
            raise self._error(exc) from exc
        if response.status_code != 200:
            raise self._status_error(response.status_code, response.text)
        return response

    def served_model(self) -> str:
        if self.model is None:
            try:
                response = self.client.get("/v1/models")
            except self._httpx.HTTPError as exc:
                raise self._error(exc) from exc
            if response.status_code != 200:
                raise self._status_error(response.status_code, response.text)
            self.model = str(response.json()["data"][0]["id"])
        return self.model

    def _data_url(self, upload: Upload) -> str:
        return "data:application/octet-stream;base64," + base64.b64encode(upload.data).decode()

    def perceive(self, upload: Upload, experts: Sequence[str]) -> Seen:
        if not experts:
            return Seen(None, None, "   ")
        body = {"image": base64.b64encode(upload.data).decode(), "experts": list(experts)}
        perception = PerceptionResult.from_json(self._post("/v1/perceive", body).text)
        return Seen(perception, _picture(perception, upload), verbalize(perception))

    def answer(self, upload: Upload, prompt: str, seen: Seen, settings: Settings) -> Iterator[Union[str, Finished]]:
        body = {
            "model": self.served_model(),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": prompt},
                        {"type": "image_url", "image_url": {"url": self._data_url(upload)}},
                    ],
                }
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "moai": {"return_perception": True},
            **settings.request_fields(),
        }
        text, details, verbalization = [], {}, None
        try:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._status_error(response.status_code, response.read().decode("utf-8", "replace"))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise ServerError(f"the server stopped the answer: {event['error'].get('message')}")
                    if event.get("usage"):
                        details["usage"] = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text.append(piece)
                            yield piece
                        if choice.get("finish_reason"):
                            details["finish_reason"] = choice["finish_reason"]
                    moai = event.get("moai")
                    if moai:
                        verbalization = moai.get("aux_text")
                        details["token_counts"] = moai.get("token_counts")
                        details["timings_s"] = _rounded(moai.get("timings") or {})
                        details["batch_size"] = moai.get("batch_size")
        except self._httpx.HTTPError as exc:
            raise self._error(exc) from exc
        details["model"] = body["model"]
        yield Finished("".join(text), details, None, verbalization)

    def ablate(self, upload: Upload, prompt: str, seen: Seen, settings: Settings) -> list[list[Any]]:
        raise ConfigError(
            "ablation needs the pipeline in this process: start `moai ui MODEL` (or --tiny DIR) instead of --server"
        )

    def close(self) -> None:
        self.client.close()


__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_NEW_TOKENS_CAP",
    "Finished",
    "LocalBackend",
    "Seen",
    "ServerBackend",
    "ServerError",
    "Settings",
    "Upload",
    "check_prompt",
    "read_upload",
]
