"""Deprecated: the synthetic PSGTR weights moved to :mod:`moai_sdk.testing` (``synthetic_state_dict``,
``GOLDEN_SEED``), next to the other tiny-model builders. Nothing in the package imports this alias module."""

from __future__ import annotations

import warnings

from ...testing.tiny_experts import GOLDEN_SEED, synthetic_state_dict

warnings.warn(
    "moai_sdk.experts.scene_graph.synthetic is deprecated; import synthetic_state_dict from moai_sdk.testing",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["GOLDEN_SEED", "synthetic_state_dict"]
