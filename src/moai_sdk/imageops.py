"""Image inputs: turning what users pass into RGB uint8 tensors, and the official MoAI resize.

Everything that touches a user's image before a model sees it goes through here, so the whole SDK reads
images the same way.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

logger = logging.getLogger(__name__)

#: The side length MoAI's vision tower and experts see (35 x 35 patches of 14 px).
MOAI_IMAGE_SIZE = 490
#: CLIP's image statistics on the [0, 1] scale (the official code multiplies them by 255 to normalise uint8 pixels).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union["PIL.Image.Image", str, os.PathLike, bytes, np.ndarray, torch.Tensor]  # noqa: F821


#: Largest image (width x height) decoded from a file, bytes or a URL, or accepted as a PIL image; larger ones are
#: refused with :class:`~moai_sdk.InputError` before their pixels are decoded (decompression bombs). Pillow's own
#: warning threshold by default; change it here or per call with ``max_pixels=``.
MAX_IMAGE_PIXELS = 89_478_485

#: Seconds to wait for a remote image (connect and each read), and the most bytes read from one URL.
URL_TIMEOUT_S = 10.0
MAX_URL_BYTES = 50 * 1024 * 1024

#: Longest source description put into an error message (a 10 kB path would drown the message).
_MAX_SOURCE_CHARS = 120

#: Standard ranges a wide pixel type is scaled from, smallest first: the first one holding every value wins.
_STANDARD_RANGES = ((0.0, 1.0), (0.0, 255.0), (0.0, 65535.0))


def _describe(source: Any) -> str:
    """A short, readable name of an image source for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"the image bytes ({len(source)} bytes)"
    text = str(source)
    if len(text) > _MAX_SOURCE_CHARS:
        text = text[: _MAX_SOURCE_CHARS - 20] + f"...({len(text)} chars)"
    return repr(text)


def _wide_to_uint8(arr: np.ndarray, container: float | None) -> np.ndarray:
    """Scale one channel of 16/32-bit integers or floats to uint8 without clipping.

    ``container`` is the nominal maximum when the pixel type states it (65535 for Pillow's ``I;16`` modes);
    otherwise (``I`` = int32, ``F`` = float32, which hold data of any range) the smallest standard range that
    holds every value is used -- [0, 1], [0, 255], [0, 65535] -- and data outside all of them is stretched from
    its own minimum..maximum.
    """
    data = arr.astype(np.float64)
    if data.size and not np.isfinite(data).all():
        raise InputError("the image holds NaN or infinite pixel values")
    if container is not None:
        low, high = 0.0, container
    else:
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 255.0)
        low, high = next(((a, b) for a, b in _STANDARD_RANGES if lo >= a and hi <= b), (lo, max(hi, lo + 1e-12)))
        if (low, high) == (0.0, 1.0) and np.issubdtype(arr.dtype, np.integer):
            low, high = 0.0, 255.0  # integer 0/1 data is 8-bit data that happens to be dark, not a [0, 1] scale
    return np.rint((data - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)


def _pil_to_array(img: Any) -> np.ndarray:
    """PIL image to HWC uint8 with 3 or 4 channels (alpha kept, like the official tensor conversion).

    Wide pixel types are scaled, not clipped: ``I;16*`` by 65535 -> 255, ``I`` (int32) and ``F`` (float32) from
    the smallest standard range holding their values (see :func:`_wide_to_uint8`).
    """
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        arr = np.array(img)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        gray = _wide_to_uint8(np.asarray(img), 65535.0 if mode.startswith("I;16") else None)
        arr = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode in ("LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        source = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        arr = np.array(source)
    else:
        arr = np.array(img.convert("RGB"))
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise InputError(f"image mode {mode!r} gave pixel type {arr.dtype}; convert it to 8-bit RGB first")
    return arr


def _pil_open(fp: Any):
    """``PIL.Image.open``, bypassing replacements other libraries install process-wide.

    ultralytics swaps ``PIL.Image.open`` for a wrapper that, on an unreadable file, tries to pip-install a HEIF
    plugin and then fails with ``ModuleNotFoundError``; we want Pillow's own behaviour (and our clear error).
    """
    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if callable(original) and getattr(original, "__module__", "") == "PIL.Image":
            opener = original
    return opener(fp)


def _check_pixels(width: int, height: int, max_pixels: int | None, what: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{what} is empty ({width}x{height} pixels)")
    cap = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if cap is not None and width * height > cap:
        raise InputError(
            f"{what} has {width}x{height} = {width * height:,} pixels, more than the cap of {cap:,} "
            "(a guard against decompression bombs); pass max_pixels= or set moai_sdk.imageops.MAX_IMAGE_PIXELS "
            "if you trust it"
        )


def _pil_image_to_array(im: Any, max_pixels: int | None, what: str) -> np.ndarray:
    """Check the size (before decoding), decode, apply the EXIF orientation and convert to uint8 HWC.

    Animated images (GIF, APNG, WebP, multi-page TIFF) give their current frame -- the first one for a file
    just opened.
    """
    _check_pixels(im.width, im.height, max_pixels, what)
    if getattr(im, "n_frames", 1) > 1:
        logger.debug("%s is animated (%d frames); using frame %d", what, im.n_frames, im.tell())
    im.load()
    im = ImageOps.exif_transpose(im)  # phone photos: the orientation tag, as transformers' and ultralytics' loaders
    return _pil_to_array(im)


def _decode(fp: Any, max_pixels: int | None, what: str) -> np.ndarray:
    """Open and decode an encoded image (file object or path), every Pillow failure as :class:`InputError`."""
    try:
        with _pil_open(fp) as im:
            return _pil_image_to_array(im, max_pixels, what)
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(f"{what} is not an image PIL can decode: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} was refused as a decompression bomb: {exc}") from exc
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {what}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
        # Pillow reports truncated / corrupt data with these (e.g. "image file is truncated").
        raise InputError(f"cannot decode {what}: the data is truncated or corrupt ({exc})") from exc


def _fetch_url(url: str, timeout: float | None, max_bytes: int | None) -> bytes:
    """Read ``url`` (http or https) with a timeout and a byte cap."""
    timeout = URL_TIMEOUT_S if timeout is None else timeout
    cap = MAX_URL_BYTES if max_bytes is None else max_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "moai-sdk"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # only http(s): checked by the caller
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > cap:
                raise InputError(f"the image at {_describe(url)} is {int(length):,} bytes, over the {cap:,}-byte cap")
            data = response.read(cap + 1)
    except InputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(f"cannot fetch the image at {_describe(url)} (timeout {timeout} s): {exc}") from exc
    if len(data) > cap:
        raise InputError(f"the image at {_describe(url)} is larger than the {cap:,}-byte cap (max_bytes=)")
    return data


def _load_str(
    image: str | os.PathLike, allow_remote: bool, max_pixels: int | None, timeout: float | None, max_bytes: int | None
) -> np.ndarray:
    text = os.fspath(image)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    what = _describe(text)
    scheme = text.split("://", 1)[0].lower() if "://" in text[:16] else ""
    if scheme in ("http", "https"):
        if not allow_remote:
            raise InputError(
                f"{what} is a URL, and loading remote images is off: pass allow_remote=True to fetch it "
                f"(timeout {URL_TIMEOUT_S:g} s, at most {MAX_URL_BYTES:,} bytes), or download it and pass the file"
            )
        return _decode(io.BytesIO(_fetch_url(text, timeout, max_bytes)), max_pixels, what)
    if scheme:
        raise InputError(f"{what}: {scheme!r} URLs are not supported; pass a file path or an http(s) URL")
    if "\0" in text:
        raise InputError(f"{what} is not a usable file path: it contains a NUL character")
    try:
        is_file = Path(text).is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, an embedded NUL byte
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError(f"{what} is not a usable file path: {reason}") from exc
    if not is_file:
        raise InputError(f"image file not found: {what}")
    return _decode(text, max_pixels, what)


def load_image_chw(
    image: ImageInput,
    *,
    allow_remote: bool = False,
    max_pixels: int | None = None,
    timeout: float | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Return ``image`` as a uint8 tensor of shape [C, H, W] with C = 3 (RGB) or 4 (RGBA).

    Accepted: a PIL image, a path, encoded bytes, an ``http(s)://`` URL (only with ``allow_remote=True``; read
    with ``timeout`` seconds and at most ``max_bytes``), a numpy array HWC (or HW) of uint8, a torch tensor CHW
    (or HW) of uint8. The alpha channel, if any, is kept: the official demo drops it only after resizing.

    Encoded images and PIL images get their EXIF orientation applied; every Pillow mode becomes 8-bit RGB(A)
    (16/32-bit and float data scaled, not clipped); animated images give their first frame (a PIL image given
    directly: its current frame). Images with more than ``max_pixels`` pixels (default
    :data:`MAX_IMAGE_PIXELS`), empty or unreadable ones raise :class:`~moai_sdk.InputError` naming the source.
    """
    if isinstance(image, (str, os.PathLike)):
        arr = _load_str(image, allow_remote, max_pixels, timeout, max_bytes)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        arr = _decode(io.BytesIO(bytes(image)), max_pixels, _describe(image))
    elif isinstance(image, Image.Image):
        what = f"the PIL image ({image.mode}, {image.width}x{image.height})"
        try:
            arr = _pil_image_to_array(image, max_pixels, what)
        except InputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
            raise InputError(f"cannot decode {what}: {exc}") from exc
    elif isinstance(image, np.ndarray):
        return _array_to_chw(image)
    elif isinstance(image, torch.Tensor):
        return _tensor_to_chw(image)
    else:
        raise InputError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, "
            "a numpy HWC uint8 array or a torch CHW uint8 tensor"
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _array_to_chw(image: np.ndarray) -> torch.Tensor:
    arr = image[:, :, None] if image.ndim == 2 else image
    chw = (arr.shape[2], *arr.shape[:2]) if arr.ndim == 3 else arr.shape
    cast = f"{arr.dtype}. Use (x * 255).astype(np.uint8)"
    _check_image_array("numpy images must be HWC", chw, image.shape, arr.dtype == np.uint8, cast)
    if not arr.flags.writeable:
        arr = arr.copy()
    return _rgb(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))


def _tensor_to_chw(image: torch.Tensor) -> torch.Tensor:
    t = image.detach().cpu()
    t = t[None] if t.ndim == 2 else t
    cast = f"{t.dtype}. Use (x * 255).round().to(torch.uint8)"
    _check_image_array("torch images must be CHW", tuple(t.shape), image.shape, t.dtype == torch.uint8, cast)
    return _rgb(t)


def _check_image_array(layout: str, chw: Sequence[int], shape: Any, uint8: bool, got: str) -> None:
    """The one rule for numpy and torch images (``chw``: their shape in CHW order): 1, 3 or 4 channels, uint8,
    not empty; ``layout`` and ``got`` (the dtype and the cast to use) word the error."""
    kind = layout.split()[0]
    if len(chw) != 3 or chw[0] not in (1, 3, 4):
        raise InputError(f"{layout} with 1, 3 or 4 channels; got shape {tuple(shape)}")
    if not uint8:
        raise InputError(f"{kind} images must be uint8 (0-255); got {got}")
    if chw[1] == 0 or chw[2] == 0:
        raise InputError(f"the {kind} image is empty (shape {tuple(shape)})")


def _rgb(chw: torch.Tensor) -> torch.Tensor:
    """A contiguous CHW image, grey repeated to RGB."""
    return (chw.expand(3, -1, -1) if chw.shape[0] == 1 else chw).contiguous()


def official_resize(chw: torch.Tensor, size: int = MOAI_IMAGE_SIZE) -> torch.Tensor:
    """The official demo resize: uint8 CHW -> uint8 [3, size, size].

    torchvision ``Resize((size, size))`` with bilinear interpolation and ``antialias=False`` on the uint8
    tensor, then the first three channels (the official demo drops alpha without compositing). Computed with the
    same torch operations torchvision's tensor resize runs (float32 ``interpolate`` with ``align_corners=False``,
    round, cast back; an image already of that size is returned as is), so the result is identical bit for bit
    without importing torchvision (``tests/test_imageops.py`` compares the two).
    """
    if chw.dtype != torch.uint8 or chw.ndim != 3:
        raise InputError(f"official_resize expects a uint8 CHW tensor; got {chw.dtype} {tuple(chw.shape)}")
    out = chw
    if tuple(chw.shape[-2:]) != (size, size):
        resized = F.interpolate(
            chw.unsqueeze(0).to(torch.float32), size=[size, size], mode="bilinear", align_corners=False, antialias=False
        )
        out = torch.round(resized.squeeze(0)).to(torch.uint8)
    return out[:3].contiguous()


def prepare_image(image: ImageInput, size: int = MOAI_IMAGE_SIZE, **options: Any) -> torch.Tensor:
    """Load any supported image and apply the official resize: uint8 RGB [3, size, size].

    ``options`` are :func:`load_image_chw`'s (``allow_remote``, ``max_pixels``, ``timeout``, ``max_bytes``).
    """
    return official_resize(load_image_chw(image, **options), size)


def load_images(images: Sequence[Any], **options: Any) -> list[torch.Tensor]:
    """:func:`load_image_chw` for each image of a batch; in a batch of several, an error names the image's index."""
    out = []
    for index, image in enumerate(images):
        try:
            out.append(load_image_chw(image, **options))
        except InputError as exc:
            if len(images) == 1:
                raise
            raise InputError(f"image {index} of the batch: {exc}") from exc
    return out


def split_images(images: Any) -> list[Any]:
    """One image or a batch as a list: a list/tuple as is, a 4-D tensor [B, C, H, W] or array [B, H, W, C] split
    along its first axis, anything else as a single image."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images.unbind(0))
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return [images]


def per_row(values: Sequence[Any], n: int, what: str, kind: type, *, name: str, allow_none: bool = False) -> list[Any]:
    """``values`` for ``n`` rows -- one per row, or a single one shared by all -- each a ``kind`` (or None with
    ``allow_none``); otherwise an :class:`~moai_sdk.errors.InputError` naming ``what`` (plural) or ``name[i]``."""
    items = list(values)
    if len(items) == 1 and n > 1:
        items = items * n
    if len(items) != n:
        raise InputError(f"got {len(items)} {what} for {n} images; pass one per image or a single one")
    for i, item in enumerate(items):
        if not isinstance(item, kind) and not (allow_none and item is None):
            raise InputError(f"{name}[{i}] must be a {kind.__name__}; got {type(item).__name__}")
    return items


def prepare_frames(
    images: Any, size: int = MOAI_IMAGE_SIZE, **options: Any
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Load every image and apply the official resize: uint8 frames [3, size, size] and original (width, height).

    ``options`` go to :func:`load_image_chw`; an error in a batch names the image's index.
    """
    frames, sizes = [], []
    for chw in load_images(split_images(images), **options):
        sizes.append((int(chw.shape[2]), int(chw.shape[1])))
        frames.append(official_resize(chw, size))
    return frames, sizes


__all__ = [
    "MOAI_IMAGE_SIZE",
    "CLIP_MEAN",
    "CLIP_STD",
    "ImageInput",
    "MAX_IMAGE_PIXELS",
    "URL_TIMEOUT_S",
    "MAX_URL_BYTES",
    "load_image_chw",
    "load_images",
    "official_resize",
    "prepare_image",
    "split_images",
    "per_row",
    "prepare_frames",
]
