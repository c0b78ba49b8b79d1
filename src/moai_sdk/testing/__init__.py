"""A tiny offline MoAI for tests and demos: random weights, built locally in seconds, no GPU, no Hub.

Applications built on moai-sdk can test their integration in CI with it::

    from moai_sdk.testing import tiny_pipeline

    def test_my_app(tmp_path):
        pipe = tiny_pipeline(tmp_path)              # tiny MoAI + tiny experts + the real offline OCR
        result = pipe("photo.jpg", "What is written here?")
        assert result.token_counts["generated"] > 0  # the answer text itself is random tokens

What is built:

* :func:`build_tiny_moai` -- a MoAI checkpoint folder in the official layout (``config.json`` with a
  ``moai_structure`` block, ``model.safetensors``, ``tokenizer.model``, ``tokenizer_config.json``): an 8-layer
  InternLM2 of width 32 with the MoAI-Mixer in layer 8, a 2-layer CLIP tower of width 40 at 490 x 490
  (1225 patches, like MoAI-7B), the MoAI-Compressor and a 1000-piece sentencepiece tokenizer. The weights are
  random but scaled so that activations and logits stay in a sane range (greedy decoding has clear margins).
* :func:`build_tiny_experts` -- tiny random Mask2Former, OWLv2 and PSGTR checkpoints (and the real RapidOCR,
  which needs no download), as an ``experts=`` specification for :class:`~moai_sdk.pipeline.MoAIPipeline`; the
  single builders are :func:`build_tiny_mask2former`, :func:`build_tiny_owlv2` and :func:`build_tiny_psgtr`, and
  :func:`synthetic_state_dict` gives the seeded PSGTR weights the golden fixtures were made with.
* :func:`tiny_pipeline` -- both, wired into a pipeline on CPU in float32.

Every tiny-model builder of the package lives here (:mod:`.tiny_moai`, :mod:`.tiny_experts`); the old homes
``moai_sdk.experts.tiny`` and ``moai_sdk.experts.scene_graph.synthetic`` are deprecated aliases.
The answers of the tiny model are random tokens: only the plumbing is real.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Union

from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError
from ..pipeline import MoAIPipeline
from .tiny_experts import (
    GOLDEN_SEED,
    TINY_IMAGE_SIZE,
    TINY_OWLV2_MAX_TOKENS,
    TINY_PSGTR_ARCHITECTURE,
    build_tiny_experts,
    build_tiny_mask2former,
    build_tiny_owlv2,
    build_tiny_psgtr,
    synthetic_state_dict,
    tiny_psgtr_settings,
)
from .tiny_moai import (
    TINY_MOAI_CONFIG,
    TINY_RECIPE_VERSION,
    TINY_TOKENIZER_CONFIG,
    build_tiny_moai,
    init_tiny_weights,
    tiny_config,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def tiny_pipeline(directory: PathLike, experts: Any = "tiny", *, seed: int = 0, **options: Any) -> MoAIPipeline:
    """A :class:`~moai_sdk.pipeline.MoAIPipeline` on a tiny random MoAI built (or reused) in ``directory``.

    ``experts``: ``"tiny"`` (default: :func:`build_tiny_experts` in ``directory/experts``), ``None`` for none, or
    any ``experts=`` specification. Runs on CPU in float32, offline; other ``options`` go to
    :meth:`MoAIPipeline.from_pretrained`.
    """
    root = Path(directory)
    model_dir = build_tiny_moai(root / "moai", seed=seed)
    if isinstance(experts, str) and experts == "tiny":
        experts = build_tiny_experts(root / "experts", seed=seed)
    settings = {"device": "cpu", "dtype": "float32", "quantization": None, "local_files_only": True}
    for key in settings:
        if key in options:
            settings[key] = options.pop(key)
    return MoAIPipeline.from_pretrained(str(model_dir), experts=experts, **settings, **options)


def demo_image(text: str = "MOAI", size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A synthetic RGB picture: ``text`` in large dark letters over a light background, a red square and a
    blue disc below it (the real OCR reads the text)."""
    width, height = size
    if width < 64 or height < 64:
        raise ConfigError(f"demo_image needs at least 64 x 64 pixels; got {width} x {height}")
    img = Image.new("RGB", (width, height), (240, 240, 235))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, height // 8))
    draw.text((width // 12, height // 8), text, fill=(15, 15, 15), font=font)
    top = height // 2
    draw.rectangle((width // 16, top, width // 16 + width // 3, top + height // 3), fill=(200, 40, 40))
    draw.ellipse(
        (width // 2 + width // 16, top, width // 2 + width // 16 + width // 3, top + height // 3), fill=(40, 90, 200)
    )
    return img


__all__ = [
    "TINY_MOAI_CONFIG",
    "TINY_RECIPE_VERSION",
    "TINY_TOKENIZER_CONFIG",
    "TINY_IMAGE_SIZE",
    "TINY_OWLV2_MAX_TOKENS",
    "TINY_PSGTR_ARCHITECTURE",
    "GOLDEN_SEED",
    "tiny_config",
    "init_tiny_weights",
    "build_tiny_moai",
    "build_tiny_mask2former",
    "build_tiny_owlv2",
    "build_tiny_psgtr",
    "tiny_psgtr_settings",
    "synthetic_state_dict",
    "build_tiny_experts",
    "tiny_pipeline",
    "demo_image",
]
