"""Continuous (iteration-level) batching for MoAI: ``MoAIEngine`` and its parts.

``moai serve`` and ``moai batch`` run on it; apps that build their own server use it directly::

    from moai_sdk.engine import MoAIEngine

    with MoAIEngine(pipe, max_num_seqs=8) as engine:
        handle = engine.submit(image, "Describe the picture.", max_new_tokens=64)
        for piece in handle.stream():      # text pieces, then the MoAIResult
            ...

See :mod:`moai_sdk.engine.core` for how a step runs.
"""

from .core import EngineStats, MoAIEngine, StepListener
from .kv_pool import KVPool
from .requests import (
    EngineError,
    EngineRequest,
    EngineTimeout,
    EngineTokenCallback,
    RequestCancelled,
    RequestHandle,
    RequestOutput,
    RequestState,
)
from .scheduler import POLICIES, Scheduler

__all__ = [
    "MoAIEngine",
    "EngineStats",
    "StepListener",
    "KVPool",
    "Scheduler",
    "POLICIES",
    "EngineError",
    "EngineTimeout",
    "EngineRequest",
    "EngineTokenCallback",
    "RequestCancelled",
    "RequestHandle",
    "RequestOutput",
    "RequestState",
]
