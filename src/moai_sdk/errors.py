"""The exception hierarchy of moai-sdk.

Every error the SDK raises on purpose is a :class:`MoAIError`. Each message names the problem and, where
there is one, the fix.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MoAIError(Exception):
    """Base class of every error raised by moai-sdk."""


class ConfigError(MoAIError, ValueError):
    """A configuration value is missing, inconsistent or unsupported."""


class CheckpointError(MoAIError):
    """A checkpoint cannot be found, read or matched to the model."""


class MissingKeysError(CheckpointError):
    """The checkpoint lacks weights the model needs, or holds weights the model does not know."""

    def __init__(self, message: str, missing: list[str] | None = None, unexpected: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint asks to run code that is not on the allow list."""


class DependencyError(MoAIError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


class InputError(MoAIError, ValueError):
    """An input (image, prompt, tensor, option) is malformed."""


class ExpertError(MoAIError):
    """A perception expert failed; ``expert`` names it."""

    def __init__(self, expert: str, message: str):
        super().__init__(f"expert {expert!r}: {message}")
        self.expert = expert


class GenerationError(MoAIError):
    """Generation settings are invalid or generation could not proceed."""


def import_optional(module: str, need: str) -> ModuleType:
    """``module`` imported, or a :class:`DependencyError` with ``need`` (what needs it and how to install it): the
    one way the package imports an optional dependency."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(need) from exc


__all__ = [
    "MoAIError",
    "ConfigError",
    "CheckpointError",
    "MissingKeysError",
    "UnsafeCheckpointError",
    "DependencyError",
    "InputError",
    "ExpertError",
    "GenerationError",
]
