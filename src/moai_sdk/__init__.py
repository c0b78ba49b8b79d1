"""moai-sdk: an inference SDK for MoAI (Mixture of All Intelligence, arXiv 2403.07508)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DependencyError,
    ExpertError,
    GenerationError,
    InputError,
    MissingKeysError,
    MoAIError,
    UnsafeCheckpointError,
)
