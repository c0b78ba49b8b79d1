"""Typed, JSON-ready gate weights of the MoAI-Mixer for one answer (Pydantic v2; no torch).

Every mixer layer of MoAI (decoder layers 7, 15, 23, 31 of MoAI-7B) has two gates. The image gate weighs three
experts for every image token: image->aux (``moai_CA_img_aux``, cross-attention to the compressed perception
tokens), image->language (``moai_CA_img_lang``) and image self-attention (``moai_SA_img``); the language gate
weighs language->aux (``moai_CA_lang_aux``), language->image (``moai_CA_lang_img``) and language
self-attention (``moai_SA_lang``) for every language token. Columns are always in this order, which is the
order of the official ``moai_GA_img`` / ``moai_GA_lang`` outputs.

:class:`MixerGates` holds, per layer, the mean weights over the image tokens and over the language tokens
(the whole text prompt the model reads: system prompt, template and question; padding excluded), and, when
asked, the per-token weights. The weights are the softmax the model applied (float16 in the released
numerics), written as exact floats. :mod:`moai_sdk.explain` builds these from the model's
:class:`~moai_sdk.modeling.mixer.GateWeights`; :meth:`MixerGates.plot` draws the paper-style figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image as PILImage
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError
from .viz_explain import plot_gates

#: The image gate's experts (official module names), in column order.
IMAGE_GATE_EXPERTS: tuple[str, str, str] = ("moai_CA_img_aux", "moai_CA_img_lang", "moai_SA_img")
#: The language gate's experts (official module names), in column order.
LANGUAGE_GATE_EXPERTS: tuple[str, str, str] = ("moai_CA_lang_aux", "moai_CA_lang_img", "moai_SA_lang")
#: Short readable names of the same columns.
IMAGE_GATE_LABELS: tuple[str, str, str] = ("image->aux", "image->language", "image self")
LANGUAGE_GATE_LABELS: tuple[str, str, str] = ("language->aux", "language->image", "language self")

Triple = tuple[float, float, float]


class LayerGates(BaseModel):
    """Gate weights of one mixer layer for one answer.

    ``image`` / ``language``: mean weights over the image tokens / the language tokens (three columns, see
    the module docstring). ``image_tokens`` [N_image][3] / ``language_tokens`` [N_language][3]: the per-token
    weights when asked (language rows in prompt order, padding excluded).
    """

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0)
    image: Triple
    language: Triple
    image_tokens: Optional[list[Triple]] = None
    language_tokens: Optional[list[Triple]] = None


class MixerGates(BaseModel):
    """The MoAI-Mixer's gate weights for one answer, one :class:`LayerGates` per mixer layer in layer order.

    ``num_image_tokens`` / ``num_language_tokens``: how many rows each mean covers. ``language_token_ids``
    (with the per-token arrays): the prompt token id of each language row. ``dtype``: the gate softmax dtype.
    """

    model_config = ConfigDict(extra="forbid")

    image_experts: tuple[str, str, str] = IMAGE_GATE_EXPERTS
    language_experts: tuple[str, str, str] = LANGUAGE_GATE_EXPERTS
    dtype: str = "float16"
    num_image_tokens: int = Field(ge=0)
    num_language_tokens: int = Field(ge=0)
    language_token_ids: Optional[list[int]] = None
    layers: list[LayerGates] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> MixerGates:
        for lg in self.layers:
            if lg.image_tokens is not None and len(lg.image_tokens) != self.num_image_tokens:
                raise ValueError(f"layer {lg.layer}: {len(lg.image_tokens)} image rows, {self.num_image_tokens} tokens")
            if lg.language_tokens is not None and len(lg.language_tokens) != self.num_language_tokens:
                raise ValueError(
                    f"layer {lg.layer}: {len(lg.language_tokens)} language rows, {self.num_language_tokens} tokens"
                )
        if self.language_token_ids is not None and len(self.language_token_ids) != self.num_language_tokens:
            raise ValueError(f"{len(self.language_token_ids)} language token ids for {self.num_language_tokens} rows")
        return self

    def shares(self) -> np.ndarray:
        """Per layer the six experts' mean weights: float64 [layers, 6] = image gate columns, then language."""
        return np.array([[*lg.image, *lg.language] for lg in self.layers], dtype=np.float64).reshape(-1, 6)

    def mean(self) -> tuple[Triple, Triple]:
        """The image and language gate weights averaged over the mixer layers."""
        if not self.layers:
            raise InputError("no mixer layers recorded (the mixer did not run)")
        m = self.shares().mean(0)
        return (float(m[0]), float(m[1]), float(m[2])), (float(m[3]), float(m[4]), float(m[5]))

    def plot(self, title: Optional[str] = None, **kwargs: Any) -> PILImage.Image:
        """Per layer, the two gates' shares of their experts as stacked bars (see
        :func:`moai_sdk.viz_explain.plot_gates`)."""
        return plot_gates(
            [lg.layer for lg in self.layers],
            [lg.image for lg in self.layers],
            [lg.language for lg in self.layers],
            image_labels=IMAGE_GATE_LABELS,
            language_labels=LANGUAGE_GATE_LABELS,
            title=title,
            **kwargs,
        )

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        """``*.json`` writes the gate weights as JSON; other suffixes the :meth:`plot` picture."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            if kwargs:
                raise InputError(f"saving JSON takes no options; got {sorted(kwargs)}")
            path.write_text(self.model_dump_json(), encoding="utf-8")
        else:
            self.plot(**kwargs).save(path)
        return path


__all__ = [
    "LayerGates",
    "MixerGates",
    "IMAGE_GATE_EXPERTS",
    "LANGUAGE_GATE_EXPERTS",
    "IMAGE_GATE_LABELS",
    "LANGUAGE_GATE_LABELS",
]
