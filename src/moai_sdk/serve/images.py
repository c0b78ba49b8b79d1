"""Images of requests: ``data:`` URLs (and, only when the server allows it, ``http(s)`` URLs) to decoded frames.

Decoding happens in a worker thread of the web server (not on the model's thread) through
:func:`moai_sdk.imageops.load_image_chw`, the loader the pipeline itself uses, so a served answer sees exactly the
pixels ``pipe(image_bytes, prompt)`` sees. Every failure is a 400 :class:`~moai_sdk.serve.protocol.APIError`
naming the problem: not base64, larger than ``max_bytes``, not an image, remote URLs switched off, a remote fetch
that failed.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any, Optional

import anyio
import httpx
import torch

from ..errors import InputError
from ..imageops import load_image_chw
from .protocol import bad_request

logger = logging.getLogger(__name__)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def decode_base64(data: str, max_bytes: int, param: str) -> bytes:
    """Strict base64 (whitespace allowed) with the size checked before decoding."""
    compact = "".join(data.split())
    if len(compact) // 4 * 3 > max_bytes + 3:
        raise bad_request(
            f"the image is larger than the server's limit of {_mib(max_bytes)} (--max-image-bytes)",
            param,
            "image_too_large",
        )
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"the image is not valid base64: {exc}", param, "invalid_base64") from exc
    if len(raw) > max_bytes:
        raise bad_request(
            f"the image is larger than the server's limit of {_mib(max_bytes)} (--max-image-bytes)",
            param,
            "image_too_large",
        )
    if not raw:
        raise bad_request("the image is empty", param, "invalid_image")
    return raw


def split_data_url(url: str, param: str) -> str:
    """The base64 payload of ``data:[<media type>][;params];base64,<payload>``."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise bad_request("a data: URL looks like 'data:image/png;base64,<base64 bytes>'", param, "invalid_data_url")
    params = header[len("data:") :].split(";")
    if "base64" not in params[1:]:
        raise bad_request(
            "only base64 data: URLs are supported ('data:image/png;base64,...')", param, "invalid_data_url"
        )
    media = params[0].strip().lower()
    if media and not media.startswith("image/") and media != "application/octet-stream":
        raise bad_request(f"the data: URL holds {media!r}, not an image", param, "invalid_image")
    return payload


async def fetch_remote(url: str, max_bytes: int, timeout: float, param: str) -> bytes:
    """GET ``url`` with a timeout and a byte cap (the body is read in chunks and abandoned past the cap)."""
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url, headers={"User-Agent": "moai-sdk"}) as response:
                if response.status_code != 200:
                    raise bad_request(
                        f"fetching the image failed: HTTP {response.status_code} from {url[:200]}", param, "image_fetch"
                    )
                chunks: list[bytes] = []
                size = 0
                async for piece in response.aiter_bytes():
                    size += len(piece)
                    if size > max_bytes:
                        raise bad_request(
                            f"the image at {url[:200]} is larger than the server's limit of {_mib(max_bytes)}",
                            param,
                            "image_too_large",
                        )
                    chunks.append(piece)
                return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise bad_request(f"fetching the image failed: {type(exc).__name__}: {exc}", param, "image_fetch") from exc


async def image_bytes(
    ref: str,
    *,
    max_bytes: int,
    allow_remote: bool,
    remote_timeout: float = 10.0,
    allow_bare_base64: bool = False,
    param: str = "image_url",
) -> bytes:
    """The encoded image a request refers to."""
    ref = ref.strip()
    if ref.startswith("data:"):
        return decode_base64(split_data_url(ref, param), max_bytes, param)
    if ref.startswith(("http://", "https://")):
        if not allow_remote:
            raise bad_request(
                "remote image URLs are switched off on this server: send the image inline as a data: URL "
                "('data:image/png;base64,...'), or start the server with --allow-remote-images",
                param,
                "remote_images_disabled",
            )
        return await fetch_remote(ref, max_bytes, remote_timeout, param)
    if allow_bare_base64:
        return decode_base64(ref, max_bytes, param)
    raise bad_request(
        "the image must be a data: URL ('data:image/png;base64,...') or an http(s) URL", param, "invalid_image_url"
    )


def decode_image(raw: bytes, param: str = "image_url") -> torch.Tensor:
    """Encoded bytes -> uint8 [C, H, W], every decoding problem as a 400."""
    try:
        return load_image_chw(raw)
    except InputError as exc:
        raise bad_request(f"the image could not be read: {exc}", param, "invalid_image") from exc


async def load_request_image(
    ref: str,
    *,
    param: str = "image_url",
    limiter: Optional[anyio.CapacityLimiter] = None,
    **fetch: Any,
) -> torch.Tensor:
    """Fetch / decode the image of a request off the event loop (``fetch``: the keywords of :func:`image_bytes`)."""
    raw = await image_bytes(ref, param=param, **fetch)
    return await anyio.to_thread.run_sync(decode_image, raw, param, limiter=limiter)
