"""Image inputs: turning what users pass into RGB uint8 tensors, and the official MoAI resize.

Everything that touches a user's image before a model sees it goes through here, so the whole SDK reads
images the same way.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import InputError

#: The side length MoAI's vision tower and experts see (35 x 35 patches of 14 px).
MOAI_IMAGE_SIZE = 490

ImageInput = Union["PIL.Image.Image", str, os.PathLike, bytes, np.ndarray, torch.Tensor]  # noqa: F821


def _pil_to_array(img: Any) -> np.ndarray:
    """PIL image to HWC uint8 with 3 or 4 channels (alpha kept, like the official tensor conversion)."""
    if img.mode in ("RGB", "RGBA"):
        arr = np.array(img)
    elif img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        arr = np.array(img.convert("RGBA"))
    else:
        arr = np.array(img.convert("RGB"))
    if arr.dtype != np.uint8:
        raise InputError(f"image has pixel type {arr.dtype}; convert it to 8-bit RGB first")
    return arr


def _pil_open(fp: Any):
    """``PIL.Image.open``, bypassing replacements other libraries install process-wide.

    ultralytics swaps ``PIL.Image.open`` for a wrapper that, on an unreadable file, tries to pip-install a HEIF
    plugin and then fails with ``ModuleNotFoundError``; we want Pillow's own behaviour (and our clear error).
    """
    import sys

    from PIL import Image

    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        original = getattr(sys.modules.get(opener.__module__), "_image_open", None)
        if callable(original) and getattr(original, "__module__", "") == "PIL.Image":
            opener = original
    return opener(fp)


def load_image_chw(image: ImageInput) -> torch.Tensor:
    """Return ``image`` as a uint8 tensor of shape [C, H, W] with C = 3 (RGB) or 4 (RGBA).

    Accepted: a PIL image, a path, encoded bytes, a numpy array HWC (or HW) of uint8, a torch tensor CHW
    (or HW) of uint8. The alpha channel, if any, is kept: the official demo drops it only after resizing.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {str(path)!r}")
        try:
            with _pil_open(path) as im:
                im.load()
                arr = _pil_to_array(im)
        except UnidentifiedImageError as exc:
            raise InputError(f"cannot read {str(path)!r} as an image: {exc}") from exc
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with _pil_open(io.BytesIO(bytes(image))) as im:
                im.load()
                arr = _pil_to_array(im)
        except UnidentifiedImageError as exc:
            raise InputError(f"the bytes given are not an image PIL can decode: {exc}") from exc
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if isinstance(image, Image.Image):
        arr = _pil_to_array(image)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise InputError(f"numpy images must be HWC with 1, 3 or 4 channels; got shape {tuple(image.shape)}")
        if arr.dtype != np.uint8:
            raise InputError(f"numpy images must be uint8 (0-255); got {arr.dtype}. Use (x * 255).astype(np.uint8)")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise InputError(f"torch images must be CHW with 1, 3 or 4 channels; got shape {tuple(image.shape)}")
        if t.dtype != torch.uint8:
            raise InputError(
                f"torch images must be uint8 (0-255); got {t.dtype}. Use (x * 255).round().to(torch.uint8)"
            )
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.contiguous()
    raise InputError(
        f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, "
        "a numpy HWC uint8 array or a torch CHW uint8 tensor"
    )


def official_resize(chw: torch.Tensor, size: int = MOAI_IMAGE_SIZE) -> torch.Tensor:
    """The official demo resize: uint8 CHW -> uint8 [3, size, size].

    torchvision ``Resize((size, size))`` with bilinear interpolation and ``antialias=False`` on the uint8
    tensor, then the first three channels (the official demo drops alpha without compositing).
    """
    from torchvision.transforms.functional import InterpolationMode, resize

    if chw.dtype != torch.uint8 or chw.ndim != 3:
        raise InputError(f"official_resize expects a uint8 CHW tensor; got {chw.dtype} {tuple(chw.shape)}")
    out = resize(chw, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return out[:3].contiguous()


def prepare_image(image: ImageInput, size: int = MOAI_IMAGE_SIZE) -> torch.Tensor:
    """Load any supported image and apply the official resize: uint8 RGB [3, size, size]."""
    return official_resize(load_image_chw(image), size)


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


def prepare_frames(images: Any, size: int = MOAI_IMAGE_SIZE) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Load every image and apply the official resize: uint8 frames [3, size, size] and original (width, height)."""
    frames, sizes = [], []
    for image in split_images(images):
        chw = load_image_chw(image)
        sizes.append((int(chw.shape[2]), int(chw.shape[1])))
        frames.append(official_resize(chw, size))
    return frames, sizes


def chw_to_pil(chw: torch.Tensor):
    """uint8 CHW tensor (3 channels) to a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(chw[:3].permute(1, 2, 0).contiguous().numpy(), mode="RGB")


__all__ = [
    "MOAI_IMAGE_SIZE",
    "ImageInput",
    "load_image_chw",
    "official_resize",
    "prepare_image",
    "split_images",
    "prepare_frames",
    "chw_to_pil",
]
