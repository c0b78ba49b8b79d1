"""moai-sdk: an inference SDK for MoAI (Mixture of All Intelligence, arXiv 2403.07508).

Public names are importable from here; heavy modules (torch models, transformers) load on first use.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
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

__version__ = "0.1.0"


class _TorchaoEnumNotice(logging.Filter):
    """Drops torch's notice that *torchao* registers its Enum classes with pytree (deprecated since torch 2.10).

    transformers' ``modeling_utils`` imports torchao whenever it is installed (for its quantizer registry), so the
    first transformers model we build (the CLIP tower, an expert) would print two ``torch/utils/_pytree.py``
    warnings about ``KernelPreference`` / ``ScaleCalculationMode`` that concern torchao's code and that no user
    can act on. Only those records are dropped: the message and the enum's module must both match.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("%s is an Enum subclass and is now natively")):
            return True
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not str(getattr(cls, "__module__", "")).startswith("torchao")


if not any(isinstance(f, _TorchaoEnumNotice) for f in logging.getLogger("torch.utils._pytree").filters):
    logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())

_LAZY: dict[str, str] = {
    # model
    "MoAIForCausalLM": "moai_sdk.modeling",
    "MoAIConfig": "moai_sdk.modeling",
    "GenerationSettings": "moai_sdk.modeling",
    "GenerateOutput": "moai_sdk.modeling",
    # text and images
    "MoAITokenizer": "moai_sdk.tokenization",
    "MoAIProcessor": "moai_sdk.processing",
    "MoAIInputs": "moai_sdk.processing",
    "build_prompt": "moai_sdk.prompts",
    "SYSTEM_PROMPT": "moai_sdk.prompts",
    # results and verbalization
    "Box": "moai_sdk.results",
    "Segment": "moai_sdk.results",
    "Detection": "moai_sdk.results",
    "Relation": "moai_sdk.results",
    "TextLine": "moai_sdk.results",
    "PerceptionResult": "moai_sdk.results",
    "MoAIResult": "moai_sdk.results",
    "TokenLogprob": "moai_sdk.results",
    "TopLogprob": "moai_sdk.results",
    "ScoreResult": "moai_sdk.results",
    "ContinuationScore": "moai_sdk.results",
    "StructuredOutputs": "moai_sdk.structured",
    "verbalize": "moai_sdk.verbalization",
    "verbalize_parts": "moai_sdk.verbalization",
    "VerbalizationParts": "moai_sdk.verbalization",
    "plot_perception": "moai_sdk.viz",
    # experts
    "Expert": "moai_sdk.experts.base",
    "register_expert": "moai_sdk.experts.base",
    "create_expert": "moai_sdk.experts.base",
    "available_experts": "moai_sdk.experts.base",
    "Perception": "moai_sdk.experts.base",
    "Mask2FormerExpert": "moai_sdk.experts.segmentation",
    "YoloSegExpert": "moai_sdk.experts.segmentation",
    "Owlv2Expert": "moai_sdk.experts.detection",
    "YoloWorldExpert": "moai_sdk.experts.detection",
    "RapidOCRExpert": "moai_sdk.experts.ocr",
    "PaddleOCRExpert": "moai_sdk.experts.ocr",
    "PSGTRExpert": "moai_sdk.experts.scene_graph",
    "PSGTRConfig": "moai_sdk.experts.scene_graph",
    "ExpertCache": "moai_sdk.cache",
    # facade
    "MoAIPipeline": "moai_sdk.pipeline",
}

__all__ = ["__version__", *errors.__all__, *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'moai_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .cache import ExpertCache
    from .experts.base import Expert, Perception, available_experts, create_expert, register_expert
    from .experts.detection import Owlv2Expert, YoloWorldExpert
    from .experts.ocr import PaddleOCRExpert, RapidOCRExpert
    from .experts.scene_graph import PSGTRConfig, PSGTRExpert
    from .experts.segmentation import Mask2FormerExpert, YoloSegExpert
    from .modeling import GenerateOutput, GenerationSettings, MoAIConfig, MoAIForCausalLM
    from .pipeline import MoAIPipeline
    from .processing import MoAIInputs, MoAIProcessor
    from .prompts import SYSTEM_PROMPT, build_prompt
    from .results import (
        Box,
        ContinuationScore,
        Detection,
        MoAIResult,
        PerceptionResult,
        Relation,
        ScoreResult,
        Segment,
        TextLine,
        TokenLogprob,
        TopLogprob,
    )
    from .structured import StructuredOutputs
    from .tokenization import MoAITokenizer
    from .verbalization import VerbalizationParts, verbalize, verbalize_parts
    from .viz import plot_perception
