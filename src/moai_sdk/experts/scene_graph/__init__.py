"""PSGTR scene-graph generation (OpenPSG, ECCV 2022) in plain PyTorch, as MoAI runs it.

* :mod:`.config` -- :class:`PSGTRConfig` (architecture + MoAI pre/post-processing settings) and the official
  checkpoint's location and hash.
* :mod:`.modeling` -- the network (:class:`PSGTR`).
* :mod:`.checkpoint` -- download, SHA-256 check, restricted unpickling, key spellings, safetensors cache.
* :mod:`.processing` -- MoAI's pre-processing and post-processing (:class:`SceneGraphPrediction`).
* :mod:`.expert` -- the registered expert ``psgtr`` (task ``scene_graph``).

Reproducible synthetic weights for tests and demos are :func:`moai_sdk.testing.synthetic_state_dict`
(``synthetic_state_dict`` here is a deprecated alias, resolved on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

from .checkpoint import LoadedWeights, load_into, resolve_weights, safe_torch_load
from .config import (
    OFFICIAL_FILENAME,
    OFFICIAL_REPO_ID,
    OFFICIAL_REPO_TYPE,
    OFFICIAL_SHA256,
    PSGTRConfig,
)
from .expert import PSGTRExpert, prediction_to_fields
from .modeling import PSGTR, PSGTROutput
from .processing import SceneGraphPrediction, postprocess, preprocess_image


def __getattr__(name: str) -> Any:
    """The deprecated ``synthetic_state_dict`` alias (its module warns and forwards to ``moai_sdk.testing``)."""
    if name == "synthetic_state_dict":
        return importlib.import_module(f"{__name__}.synthetic").synthetic_state_dict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PSGTRConfig",
    "PSGTR",
    "PSGTROutput",
    "PSGTRExpert",
    "SceneGraphPrediction",
    "preprocess_image",
    "postprocess",
    "prediction_to_fields",
    "resolve_weights",
    "load_into",
    "safe_torch_load",
    "LoadedWeights",
    "OFFICIAL_REPO_ID",
    "OFFICIAL_REPO_TYPE",
    "OFFICIAL_FILENAME",
    "OFFICIAL_SHA256",
]
