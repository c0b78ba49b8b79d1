"""Perception experts: the interface, the registry and the runner.

Concrete experts (segmentation, detection, scene graph, OCR) live in sibling modules; they register
themselves when imported, and :func:`available_experts` / :func:`create_expert` import them on demand (their
heavy dependencies are imported only when a model loads).
"""

from __future__ import annotations

from .base import (
    SCENE_GRAPH_MISSING_WARNING,
    Expert,
    Perception,
    available_experts,
    create_expert,
    get_expert_class,
    register_expert,
    unregister_expert,
)
from .settings import ExpertSettings, PositiveInt, UnitFloat

__all__ = [
    "Expert",
    "Perception",
    "register_expert",
    "unregister_expert",
    "create_expert",
    "get_expert_class",
    "available_experts",
    "SCENE_GRAPH_MISSING_WARNING",
    "ExpertSettings",
    "UnitFloat",
    "PositiveInt",
]
