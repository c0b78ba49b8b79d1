"""Pictures of perception results (PIL only, no matplotlib).

:func:`plot_perception` draws, on the expert frame (490 x 490):

* ``segments``: the official panoptic colour map (Pascal-VOC colour of each segment id) blended over the
  image with weight ``alpha`` on labelled pixels (unlabelled pixels are left as they are), plus each
  segment's cleaned class name at its box centre;
* ``detections``: box outlines with ``label score``;
* ``relations``: arrows from subject to object box centres labelled with the predicate (the relations
  scoring at least ``min_relation_score``, at most ``max_relations`` of them, best first);
* ``text``: OCR polygons with their text.

The blend is exact and documented so that it can be tested: for a labelled pixel,
``out = rint((1 - alpha) * image + alpha * 255 * colour)`` per channel (float64, clipped to 0..255).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import InputError
from .imageops import load_image_chw, official_resize
from .labels import clean_coco_name, label_colour, number_duplicates, pascal_colormap

if TYPE_CHECKING:  # pragma: no cover
    from .results import PerceptionResult

logger = logging.getLogger(__name__)

#: What can be drawn, in drawing order.
LAYERS: tuple[str, ...] = ("segments", "detections", "relations", "text")
#: Canvas colour when no image is given or kept.
BACKGROUND_GREY = (128, 128, 128)

_RELATION_COLOUR = (255, 255, 0)
#: What :func:`plot_perception` reads from a :class:`~moai_sdk.results.PerceptionResult`.
_RESULT_FIELDS = ("frame_width", "frame_height", "frame_image", "panoptic_ids", "segments", "detections", "relations")
_TEXT_COLOUR = (0, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        logger.debug("DejaVuSans.ttf not found; using PIL's default font")
        return ImageFont.load_default(size=size)


def _canvas(result: PerceptionResult, image: Any) -> np.ndarray:
    """RGB uint8 H x W x 3 canvas of the frame size."""
    frame = (result.frame_height, result.frame_width)
    if image is None:
        if result.frame_image is not None:
            return result.frame_image.copy()
        return np.full(frame + (3,), BACKGROUND_GREY, dtype=np.uint8)
    chw = load_image_chw(image)
    if tuple(chw.shape[1:]) != frame:
        if frame[0] != frame[1]:
            raise InputError(f"image is {tuple(chw.shape[1:])} but the result's frame is {frame}; pass the frame image")
        chw = official_resize(chw, frame[0])
    return chw[:3].permute(1, 2, 0).contiguous().numpy().copy()


def blend_segments(canvas: np.ndarray, result: PerceptionResult, alpha: float) -> np.ndarray:
    """Blend the panoptic colour map over ``canvas`` on pixels with a coloured segment id (1..133)."""
    ids = result.panoptic_id_map()
    colours = result.panoptic_color_map()
    labelled = (ids > 0) & (ids < len(pascal_colormap()))
    mixed = (1.0 - alpha) * canvas.astype(np.float64) + alpha * 255.0 * colours
    out = canvas.copy()
    out[labelled] = np.clip(np.rint(mixed[labelled]), 0, 255).astype(np.uint8)
    return out


def _text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _tag(
    draw: Any, xy: tuple[float, float], text: str, colour: tuple[int, int, int], font: Any, above: bool = True
) -> None:
    """Text on a filled background whose bottom-left (``above``) or top-left corner is ``xy``."""
    w, h = _text_size(draw, text, font)
    x, y = xy
    top = y - h - 4 if above else y
    if top < 0:
        top = y
    draw.rectangle([x, top, x + w + 4, top + h + 4], fill=colour)
    lum = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text(
        (x + 2, top + 2 - draw.textbbox((0, 0), text, font=font)[1]),
        text,
        font=font,
        fill=(0, 0, 0) if lum > 140 else (255, 255, 255),
    )


def _rect(box: Any) -> list[float]:
    """A box as PIL wants it (x0 <= x1, y0 <= y1), whatever order the expert gave."""
    return [min(box.x0, box.x1), min(box.y0, box.y1), max(box.x0, box.x1), max(box.y0, box.y1)]


def _arrow(
    draw: Any, start: tuple[float, float], end: tuple[float, float], colour: tuple[int, int, int], width: int
) -> None:
    draw.line([start, end], fill=colour, width=width)
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = float(np.hypot(dx, dy))
    if length < 1e-6:
        return
    ux, uy = dx / length, dy / length
    head = min(12.0, length / 3)
    left = (end[0] - head * ux + head * 0.5 * uy, end[1] - head * uy - head * 0.5 * ux)
    right = (end[0] - head * ux - head * 0.5 * uy, end[1] - head * uy + head * 0.5 * ux)
    draw.polygon([end, left, right], fill=colour)


def plot_perception(
    result: PerceptionResult,
    image: Any = None,
    *,
    show: Sequence[str] = LAYERS,
    alpha: float = 0.5,
    line_width: int = 2,
    font_size: Optional[int] = None,
    min_relation_score: float = 0.8,
    max_relations: int = 10,
) -> Image.Image:
    """Draw ``result`` over ``image`` (any image input; default: the kept frame, else a grey canvas).

    The image is brought to the result's frame with the official resize when its size differs. Returns a
    new RGB PIL image of the frame size.
    """
    if not all(hasattr(result, name) for name in _RESULT_FIELDS):  # duck-typed: this module does not import results
        raise InputError(f"plot_perception needs a PerceptionResult; got {type(result).__name__}")
    if isinstance(show, str):
        show = (show,)
    unknown = sorted(set(show) - set(LAYERS))
    if unknown:
        raise InputError(f"unknown layer(s) {unknown} in show; choose from {list(LAYERS)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be within [0, 1]; got {alpha}")
    if line_width < 1:
        raise InputError(f"line_width must be >= 1; got {line_width}")

    canvas = _canvas(result, image)
    can_blend = result.panoptic_ids is not None or (
        bool(result.segments) and all(s.get_mask() is not None for s in result.segments)
    )
    if "segments" in show and can_blend:
        canvas = blend_segments(canvas, result, float(alpha))
    elif "segments" in show and result.segments:
        logger.info("segments have no masks or id map; drawing their boxes only")

    img = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(img)
    font = _font(font_size or max(10, result.frame_width // 40))
    table = pascal_colormap()

    if "segments" in show:
        for seg in result.segments:
            if seg.area <= 0:
                continue
            colour = tuple(int(round(c * 255)) for c in table[seg.id]) if seg.id < len(table) else (0, 0, 0)
            if not can_blend:
                draw.rectangle(_rect(seg.box), outline=colour, width=line_width)
            cx, cy = seg.box.center
            _tag(draw, (cx, cy), clean_coco_name(seg.label), colour, font, above=False)

    if "detections" in show:
        for det in result.detections:
            colour = label_colour(det.label, det.label_index)
            draw.rectangle(_rect(det.box), outline=colour, width=line_width)
            _tag(draw, (det.box.x0, det.box.y0), f"{det.label} {det.score:.2f}", colour, font)

    if "relations" in show and result.relations:
        names = number_duplicates([clean_coco_name(o.label) for o in result.scene_graph_objects])
        ranked = sorted(range(len(result.relations)), key=lambda i: (-result.relations[i].score, i))
        chosen = [i for i in ranked if result.relations[i].score >= min_relation_score][:max_relations]
        for i in chosen:
            rel = result.relations[i]
            sub, obj = result.scene_graph_objects[rel.subject_index], result.scene_graph_objects[rel.object_index]
            if sub.box.area <= 0 and obj.box.area <= 0:
                continue
            start, end = sub.box.center, obj.box.center
            _arrow(draw, start, end, _RELATION_COLOUR, line_width)
            mid = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
            _tag(draw, mid, rel.predicate, _RELATION_COLOUR, font, above=False)
            _tag(draw, start, names[rel.subject_index], _RELATION_COLOUR, font)
            _tag(draw, end, names[rel.object_index], _RELATION_COLOUR, font)

    if "text" in show:
        for line in result.text_lines:
            if len(line.polygon) >= 2:
                draw.polygon(line.polygon, outline=_TEXT_COLOUR, width=line_width)
            else:
                draw.rectangle(_rect(line.box), outline=_TEXT_COLOUR, width=line_width)
            _tag(draw, (line.box.x0, line.box.y0), line.text, _TEXT_COLOUR, font)
    return img


__all__ = ["plot_perception", "blend_segments", "label_colour", "LAYERS", "BACKGROUND_GREY"]
