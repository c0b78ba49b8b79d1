"""PSGTR scene-graph generation (OpenPSG, ECCV 2022) in plain PyTorch, as MoAI runs it.

* :mod:`.config` -- :class:`PSGTRConfig` (architecture + MoAI pre/post-processing settings) and the official
  checkpoint's location and hash.
* :mod:`.modeling` -- the network (:class:`PSGTR`).
* :mod:`.checkpoint` -- download, SHA-256 check, restricted unpickling, key spellings, safetensors cache.
* :mod:`.processing` -- MoAI's pre-processing and post-processing (:class:`SceneGraphPrediction`).
* :mod:`.expert` -- the registered expert ``psgtr`` (task ``scene_graph``).
* :mod:`.synthetic` -- reproducible synthetic weights for tests and demos.
"""

from __future__ import annotations

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
from .synthetic import synthetic_state_dict

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
    "synthetic_state_dict",
    "OFFICIAL_REPO_ID",
    "OFFICIAL_REPO_TYPE",
    "OFFICIAL_FILENAME",
    "OFFICIAL_SHA256",
]
