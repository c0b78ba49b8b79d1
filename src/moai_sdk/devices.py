"""Devices and dtypes: the one place that turns user strings into ``torch.device`` / ``torch.dtype``.

* :func:`resolve_device` -- ``"auto"`` / ``None`` picks CUDA when there is one; a device that does not exist is a
  :class:`~moai_sdk.ConfigError`.
* :func:`parse_dtype` -- ``"float16"``, ``"fp16"``, ``"half"``, ``torch.bfloat16``, ... (the one table of dtype
  names); :func:`resolve_dtype` adds ``"auto"`` (float16 on CUDA, float32 elsewhere).
* :func:`synchronize` -- wait for queued device work, so that wall-clock timings of a stage include it.
* :func:`embedding` -- ``nn.Embedding`` that can be built on the meta device without importing ``torch._dynamo``.

A leaf module (it imports only torch and :mod:`moai_sdk.errors`), so the model, the processor and the pipeline
can all use it.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

#: Every dtype name the SDK accepts, and the floating dtypes it computes in.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def parse_dtype(dtype: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """``torch.float32`` / ``float16`` / ``bfloat16`` from a dtype or a name (``"fp16"``, ``"torch.bfloat16"``...).

    ``what`` names the setting in the error message.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in FLOAT_DTYPES:
            return dtype
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ConfigError(f"unsupported {what} {dtype!r}; use 'float32', 'float16' or 'bfloat16'")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The ``torch.device`` to run on: ``None`` / ``"auto"`` is CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The model dtype: ``None`` / ``"auto"`` is float16 on CUDA and float32 elsewhere, else :func:`parse_dtype`."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype, what="dtype (or 'auto')")


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA only; CPU work is synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embedding(num_embeddings: int, embedding_dim: int) -> torch.nn.Embedding:
    """``nn.Embedding(num_embeddings, embedding_dim)`` with the same N(0, 1) initialisation (same draws from the
    same generator) -- except on the meta device, where there is nothing to initialise.

    ``nn.Embedding`` initialises with ``normal_``, whose meta-device implementation is a Python reference wrapped
    for torch.compile: building a model on the meta device (as the loader does) would import ``torch._dynamo``,
    sympy and the inductor, ~230 MiB of resident memory that inference never uses.
    """
    weight = torch.empty(num_embeddings, embedding_dim)
    if weight.device.type != "meta":
        torch.nn.init.normal_(weight)
    return torch.nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "embedding", "parse_dtype", "resolve_device", "resolve_dtype", "synchronize"]
