"""``moai serve``: an OpenAI-compatible HTTP server for MoAI with dynamic batching.

``create_app(pipe, ...)`` builds the ASGI app (FastAPI) around a :class:`~moai_sdk.pipeline.MoAIPipeline`;
``moai serve`` runs it under uvicorn. Needs the ``serve`` extra (``pip install "moai-sdk[serve]"``). The names
below load on first use, so ``moai_sdk.serve.cli`` (the command's argument parser) imports without FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "ServeConfig", "EngineScheduler", "BatchScheduler", "ServerMetrics"]

_LAZY = {
    "create_app": "app",
    "ServeConfig": "app",
    "EngineScheduler": "engine_scheduler",
    "BatchScheduler": "scheduler",
    "ServerMetrics": "metrics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moai_sdk.serve' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
