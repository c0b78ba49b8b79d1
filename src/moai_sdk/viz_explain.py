"""Pictures of the MoAI-Mixer's gate weights and of per-expert ablations (PIL only, no matplotlib).

Two drawings, both from plain numbers so that this module depends on nothing else in the package (the typed
results in :mod:`moai_sdk.gates` and :mod:`moai_sdk.explain` call it, never the other way round):

* :func:`plot_gates` -- per mixer layer, two stacked bars: the image gate's shares of its three experts
  (image->aux, image->language, image self) and the language gate's shares of its three (language->aux,
  language->image, language self), i.e. the six experts' shares per layer as in the MoAI paper's analysis;
* :func:`plot_ablation` -- one row per ablation variant: its name, the verbalization size, whether the answer
  changed, the answer, and (when known) its gate shares averaged over the mixer layers.

Colours: the auxiliary (perception) experts are orange, the cross-modal experts blue, the self-attention
experts grey; the image gate uses the darker shade of each.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .errors import InputError

logger = logging.getLogger(__name__)

#: Colours of the image gate's experts (aux, language, self) and of the language gate's (aux, image, self).
IMAGE_COLOURS: tuple[tuple[int, int, int], ...] = ((211, 84, 0), (31, 97, 141), (112, 123, 124))
LANGUAGE_COLOURS: tuple[tuple[int, int, int], ...] = ((243, 156, 18), (93, 173, 226), (189, 195, 199))

_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)
_FAINT = (120, 120, 120)
_MARGIN = 16
_BAR_HEIGHT = 22
_GAP = 6


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _check_shares(name: str, rows: Sequence[Sequence[float]], n: int) -> None:
    if len(rows) != n:
        raise InputError(f"{name}: {len(rows)} rows of gate shares for {n} entries")
    for row in rows:
        if len(row) != 3:
            raise InputError(f"{name}: every row holds the shares of three experts; got {len(row)}")


def _stacked_bar(
    draw: ImageDraw.ImageDraw,
    x: int,
    y: int,
    width: int,
    height: int,
    shares: Sequence[float],
    colours: Sequence[tuple[int, int, int]],
    font: Any,
) -> None:
    """Three segments whose widths are the shares (normalised to their sum), each labelled with its percent
    when there is room."""
    total = float(sum(shares)) or 1.0
    left = float(x)
    for k, (share, colour) in enumerate(zip(shares, colours)):
        right = x + width if k == len(shares) - 1 else left + width * float(share) / total
        if right > left:
            draw.rectangle([left, y, right, y + height], fill=colour)
        label = f"{100.0 * float(share) / total:.0f}%"
        text_w = draw.textlength(label, font=font)
        if right - left >= text_w + 6:
            _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
            ty = y + (height - (bottom - top)) / 2 - top
            draw.text(((left + right - text_w) / 2, ty), label, fill=_text_colour(colour), font=font)
        left = right
    draw.rectangle([x, y, x + width, y + height], outline=_INK)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """White on dark colours, dark ink on light ones (by the Rec. 601 luma)."""
    r, g, b = background
    return (255, 255, 255) if 0.299 * r + 0.587 * g + 0.114 * b < 150 else _INK


def _legend(
    draw: ImageDraw.ImageDraw, x: int, y: int, labels: Sequence[str], colours: Sequence[tuple[int, int, int]], font: Any
) -> int:
    """Colour swatches with labels on one line; returns the x after the last label."""
    for label, colour in zip(labels, colours):
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=colour, outline=_INK)
        draw.text((x + 16, y), label, fill=_INK, font=font)
        x += 16 + int(draw.textlength(label, font=font)) + 14
    return x


def _fit(draw: ImageDraw.ImageDraw, text: str, width: float, font: Any) -> str:
    """``text`` on one line, cut with an ellipsis to fit ``width`` pixels (newlines shown as spaces)."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def plot_gates(
    layers: Sequence[int],
    image: Sequence[Sequence[float]],
    language: Sequence[Sequence[float]],
    *,
    image_labels: Sequence[str] = ("image->aux", "image->language", "image self"),
    language_labels: Sequence[str] = ("language->aux", "language->image", "language self"),
    title: Optional[str] = None,
    bar_width: int = 520,
) -> Image.Image:
    """Per mixer layer, the image gate's and the language gate's shares of their experts as stacked bars.

    ``image`` / ``language``: one row of three shares per layer (the mean gate weights), in the official
    column order; ``layers``: the decoder-layer index of each row. Returns an RGB PIL image.
    """
    if not layers:
        raise InputError("no mixer layers to draw (the mixer did not run: no image tokens?)")
    _check_shares("image", image, len(layers))
    _check_shares("language", language, len(layers))
    font, small = _font(14), _font(12)
    label_w = 200
    title_h = 26 if title else 0
    block = 2 * _BAR_HEIGHT + _GAP + 14
    height = _MARGIN * 2 + title_h + len(layers) * block + 2 * 22
    width = _MARGIN * 2 + label_w + bar_width
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    if title:
        draw.text((_MARGIN, y), title, fill=_INK, font=_font(16))
        y += title_h
    x0 = _MARGIN + label_w
    for layer, img, lang in zip(layers, image, language):
        draw.text((_MARGIN, y + 2), f"layer {layer}", fill=_INK, font=font)
        draw.text((_MARGIN + 80, y + 4), "image gate", fill=_FAINT, font=small)
        _stacked_bar(draw, x0, y, bar_width, _BAR_HEIGHT, img, IMAGE_COLOURS, small)
        y += _BAR_HEIGHT + _GAP
        draw.text((_MARGIN + 80, y + 4), "language gate", fill=_FAINT, font=small)
        _stacked_bar(draw, x0, y, bar_width, _BAR_HEIGHT, lang, LANGUAGE_COLOURS, small)
        y += _BAR_HEIGHT + 14
    _legend(draw, _MARGIN, y, image_labels, IMAGE_COLOURS, small)
    _legend(draw, _MARGIN, y + 22, language_labels, LANGUAGE_COLOURS, small)
    return canvas


def plot_ablation(
    variants: Sequence[str],
    answers: Sequence[str],
    aux_tokens: Sequence[int],
    changed: Sequence[bool],
    *,
    image: Optional[Sequence[Sequence[float]]] = None,
    language: Optional[Sequence[Sequence[float]]] = None,
    title: Optional[str] = None,
    answer_width: int = 460,
) -> Image.Image:
    """One row per variant: name, aux tokens, answer (marked when it differs from the first row's) and,
    when ``image``/``language`` shares are given (one row of three per variant, e.g. averaged over the mixer
    layers), the two gates' shares as small stacked bars. Returns an RGB PIL image."""
    n = len(variants)
    if n == 0:
        raise InputError("no ablation variants to draw")
    if not (len(answers) == len(aux_tokens) == len(changed) == n):
        raise InputError("plot_ablation needs one answer, aux token count and changed flag per variant")
    with_gates = image is not None and language is not None
    if with_gates:
        _check_shares("image", image, n)
        _check_shares("language", language, n)
    font, small = _font(14), _font(12)
    cols = [_MARGIN, _MARGIN + 190, _MARGIN + 270]  # variant, aux tokens, answer
    bar_x = cols[2] + answer_width + 12
    bar_w = 180 if with_gates else 0
    row_h = 2 * _BAR_HEIGHT + 8 if with_gates else 30
    title_h = 26 if title else 0
    width = bar_x + bar_w + _MARGIN
    height = _MARGIN * 2 + title_h + 24 + n * row_h + 26
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    if title:
        draw.text((_MARGIN, y), _fit(draw, title, width - 2 * _MARGIN, _font(16)), fill=_INK, font=_font(16))
        y += title_h
    for x, head in zip(cols + ([bar_x] if with_gates else []), ("variant", "aux tokens", "answer", "gate shares")):
        draw.text((x, y), head, fill=_FAINT, font=small)
    y += 22
    draw.line([_MARGIN, y - 4, width - _MARGIN, y - 4], fill=_FAINT)
    for i in range(n):
        ty = y + (row_h - 16) / 2
        draw.text((cols[0], ty), _fit(draw, variants[i], cols[1] - cols[0] - 8, font), fill=_INK, font=font)
        draw.text((cols[1], ty), str(aux_tokens[i]), fill=_INK, font=font)
        mark = "* " if changed[i] else ""
        colour = (192, 57, 43) if changed[i] else _INK
        draw.text((cols[2], ty), _fit(draw, mark + answers[i], answer_width, font), fill=colour, font=font)
        if with_gates:
            _stacked_bar(draw, bar_x, y + 2, bar_w, _BAR_HEIGHT - 4, image[i], IMAGE_COLOURS, small)
            _stacked_bar(draw, bar_x, y + _BAR_HEIGHT + 2, bar_w, _BAR_HEIGHT - 4, language[i], LANGUAGE_COLOURS, small)
        y += row_h
    x = _MARGIN
    if with_gates:
        x = _legend(draw, x, y + 6, ("img->aux", "img->lang", "img self"), IMAGE_COLOURS, small)
        x = _legend(draw, x + 10, y + 6, ("lang->aux", "lang->img", "lang self"), LANGUAGE_COLOURS, small) + 10
    draw.text((x, y + 6), "* answer differs from the first row's", fill=(192, 57, 43), font=small)
    return canvas


__all__ = ["plot_gates", "plot_ablation", "IMAGE_COLOURS", "LANGUAGE_COLOURS"]
