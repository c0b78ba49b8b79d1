"""``moai ui``: a web playground (Gradio) that shows what MoAI's perception experts saw and how it shaped the answer.

``pip install "moai-sdk[ui]"``, then ``moai ui MODEL`` (the pipeline in this process), ``moai ui --tiny DIR`` (a
tiny random MoAI, offline) or ``moai ui --server http://127.0.0.1:8000`` (a running ``moai serve``). From
Python::

    from moai_sdk.ui import LocalBackend, create_ui
    create_ui(LocalBackend(pipe)).launch()          # a gradio.Blocks: mount it, or launch it

:mod:`.backends` holds what the page runs (no web framework); :mod:`.app` the page itself, the only module of
moai-sdk that imports Gradio (loaded on first use of :func:`create_ui` / :func:`launch`).
"""

from __future__ import annotations

from typing import Any

from .backends import LocalBackend, ServerBackend, ServerError, Settings, read_upload


def create_ui(backend: Any, **options: Any) -> Any:
    """The playground page over ``backend`` (a ``gradio.Blocks``); see :func:`moai_sdk.ui.app.create_ui`."""
    from .app import create_ui as create

    return create(backend, **options)


def launch(backend: Any, **options: Any) -> Any:
    """Build the page and serve it; see :func:`moai_sdk.ui.app.launch`."""
    from .app import launch as run

    return run(backend, **options)


__all__ = ["LocalBackend", "ServerBackend", "ServerError", "Settings", "create_ui", "launch", "read_upload"]
