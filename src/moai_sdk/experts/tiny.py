"""Deprecated: the tiny expert builders moved to :mod:`moai_sdk.testing` (with the tiny MoAI builders).

Import ``build_tiny_mask2former``, ``build_tiny_owlv2``, ``build_tiny_psgtr``, ``tiny_psgtr_settings``,
``TINY_IMAGE_SIZE``, ``TINY_OWLV2_MAX_TOKENS`` and ``TINY_PSGTR_ARCHITECTURE`` from ``moai_sdk.testing``. Nothing in
the package imports this alias module.
"""

from __future__ import annotations

import warnings

from ..testing import tiny_experts as _moved

warnings.warn(
    "moai_sdk.experts.tiny is deprecated; import the tiny builders from moai_sdk.testing",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_moved.__all__)


def __getattr__(name: str):
    """Forward every name to :mod:`moai_sdk.testing.tiny_experts`."""
    return getattr(_moved, name)
