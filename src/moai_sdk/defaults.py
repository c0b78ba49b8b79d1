"""Names and choices that the command line needs before anything heavy loads: no imports beyond the standard library.

``moai --help`` and argument checking read these (the ``--quantization`` choices, the default model), while the
modules that act on them (:mod:`~moai_sdk.modeling.quantization`, :mod:`~moai_sdk.pipeline`,
:mod:`~moai_sdk.modeling.config`) re-export them, so there is one definition of each and importing it costs
nothing (no torch, no transformers).
"""

from __future__ import annotations

from typing import Final, Optional

#: The released MoAI checkpoint on the Hugging Face Hub.
DEFAULT_MODEL_ID: Final[str] = "BK-Lee/MoAI-7B"

#: The Hub id of the CLIP tower loaded when a checkpoint carries no vision weights.
DEFAULT_VISION_TOWER_ID: Final[str] = "openai/clip-vit-large-patch14-336"

#: The ``quantization=`` modes (``None``: nothing quantized); see :mod:`moai_sdk.modeling.quantization`.
QUANTIZATION_MODES: Final[tuple[Optional[str], ...]] = (None, "nf4", "nf4-lora", "int8", "official", "int4")

#: The ``--dtype`` choices of the command line (``auto``: float16 on CUDA, float32 on CPU).
DTYPE_CHOICES: Final[tuple[str, ...]] = ("auto", "float32", "float16", "bfloat16")

__all__ = ["DEFAULT_MODEL_ID", "DEFAULT_VISION_TOWER_ID", "QUANTIZATION_MODES", "DTYPE_CHOICES"]
