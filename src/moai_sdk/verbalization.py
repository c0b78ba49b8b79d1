"""The official MoAI verbalization: perception results -> the auxiliary text the model reads.

MoAI turns the four experts' outputs into four sentences and joins them with single spaces (empty parts
included, so "nothing found" is three spaces). The strings below reproduce the official helpers character
for character (checked against the moai-tiny oracle fixture), including their quirks, because the released
weights were trained on exactly these strings:

* numbers: a box coordinate is the float32 pixel value divided by the frame size (490) in float32, printed
  with Python ``round(x, 2)`` and ``'{:.2f}'`` -- so ``-0.00`` can appear, and detector boxes are not clipped;
* segmentation: ``"The image includes bounding box coordinates and their objects: [x0, y0, x1, y1] name, and
  ... ."`` with COCO names stripped of ``-merged``, then ``-other``, then ``-stuff``; duplicate classes are
  not numbered. The boxes are those of the ids present in the panoptic map (ascending id, x1/y1 = last
  pixel + 1, float32, times float32(1/490)) and are paired with the segments *by list position*; if a listed
  segment has no pixels there are fewer boxes than segments and the whole part is empty;
* detection: same prefix, detections with float32 score >= 0.5 in detector order, raw query names;
* scene graph: ``"The image includes relationships between objects: subject is predicate object, and ... ."``;
  objects whose cleaned name repeats are numbered in order of appearance (``car (#1)``, ``car (#2)``);
  k = min(10, number of objects) rows are chosen with NumPy 1.26's ``argpartition`` on the float32 scores
  (its order, not a sort), those with score >= 0.8 kept; when there are fewer relation rows than k the
  official helper fails internally and the part is empty;
* OCR: ``"The image includes text descriptions: text, and text."`` for lines with confidence >= 0.85.

Selection order: NumPy >= 2 may dispatch ``argpartition`` to SIMD code (x86-simd-sort on AVX-512 CPUs),
whose order differs from NumPy 1.26's introselect that produced the official strings. This module therefore
implements that introselect itself (:func:`argpartition_numpy126`), so the order is the same on every CPU
and NumPy version.

No-text OCR: PaddleOCR returns ``None`` for an image without text and the official helper then raises
``TypeError``, so the official demo cannot answer about such an image. Here an OCR expert reports "no text"
as an empty ``text_lines`` list, which verbalizes to ``''`` -- the official output for an empty OCR list.

``corrected=True`` fixes the silent failures (each difference is listed in :func:`verbalize_parts`). The
default (``corrected=False``) is the official behaviour, which is what the released weights saw.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import InputError
from .labels import clean_coco_name, number_duplicates
from .results import PerceptionResult

logger = logging.getLogger(__name__)

#: The official prefixes of the four parts.
SEGMENTATION_PREFIX = "The image includes bounding box coordinates and their objects: "
DETECTION_PREFIX = "The image includes bounding box coordinates and their objects: "
SCENE_GRAPH_PREFIX = "The image includes relationships between objects: "
OCR_PREFIX = "The image includes text descriptions: "
#: Between items of one part; every part ends with a full stop.
ITEM_JOINER = ", and "
PART_END = "."

#: Official thresholds and limits.
DETECTION_SCORE_THRESHOLD = 0.5
SCENE_GRAPH_SCORE_THRESHOLD = 0.8
SCENE_GRAPH_MAX_RELATIONS = 10
OCR_CONFIDENCE_THRESHOLD = 0.85


class VerbalizationParts(BaseModel):
    """The four verbalized parts; :attr:`text` is their official join."""

    model_config = ConfigDict(frozen=True)

    segmentation: str = ""
    detection: str = ""
    scene_graph: str = ""
    ocr: str = ""

    @property
    def text(self) -> str:
        """The auxiliary text the model reads: the four parts joined by single spaces."""
        return join_parts(self.segmentation, self.detection, self.scene_graph, self.ocr)

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------------------


def format_coordinate(value: float) -> str:
    """One coordinate as the official code prints it: Python ``round(x, 2)`` then two decimals."""
    return f"{round(float(value), 2):.2f}"


def format_box(values: Sequence[float]) -> str:
    """``[a, b, c, d]`` with :func:`format_coordinate` numbers."""
    return "[" + ", ".join(format_coordinate(v) for v in values) + "]"


def join_parts(*parts: str) -> str:
    """Official joining: the parts separated by single spaces, empty parts kept (``'A  C D'``)."""
    return " ".join(parts)


#: The official verbalization when no expert found anything: four empty parts joined by single spaces.
EMPTY_VERBALIZATION = join_parts("", "", "", "")


def _sentence(prefix: str, items: Sequence[str]) -> str:
    return prefix + ITEM_JOINER.join(items) + PART_END if items else ""


# ----------------------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------------------


def _boxes_by_id(ids: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Pixel box (x0, y0, x1 exclusive, y1 exclusive) of every positive id present in an id map."""
    ys, xs = np.nonzero(ids > 0)
    if ys.size == 0:
        return {}
    labels = ids[ys, xs]
    order = np.argsort(labels, kind="stable")
    labels, ys, xs = labels[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    x0 = np.minimum.reduceat(xs, starts)
    y0 = np.minimum.reduceat(ys, starts)
    x1 = np.maximum.reduceat(xs, starts) + 1
    y1 = np.maximum.reduceat(ys, starts) + 1
    return {int(k): (int(a), int(b), int(c), int(d)) for k, a, b, c, d in zip(labels[starts], x0, y0, x1, y1)}


def _scaled_mask_box(box: Sequence[float], frame_w: int, frame_h: int) -> list[float]:
    """A mask box in float32 multiplied in place by float32(1/frame) (the official box scaling)."""
    b = np.asarray(box, dtype=np.float32)
    sx, sy = np.float32(1.0 / frame_w), np.float32(1.0 / frame_h)
    return [float(b[0] * sx), float(b[1] * sy), float(b[2] * sx), float(b[3] * sy)]


def verbalize_segmentation(perception: PerceptionResult, *, corrected: bool = False) -> str:
    """The segmentation sentence (see the module docstring for the official rules).

    Boxes come from ``panoptic_ids`` (or the segment masks); when neither is kept the segments' own
    ``box`` / ``area`` stand in for the map (the same thing when the map's ids are the segments' ids).
    """
    _check(perception)
    segments = perception.segments
    fw, fh = perception.frame_width, perception.frame_height
    if not segments:
        return ""
    have_pixels = perception.panoptic_ids is not None or all(s.get_mask() is not None for s in segments)
    if have_pixels:
        by_id = _boxes_by_id(perception.panoptic_id_map())
    else:
        by_id = {s.id: s.box.xyxy for s in segments if s.area > 0}

    items = []
    if corrected:
        for seg in segments:
            if seg.id in by_id:
                items.append(f"{format_box(_scaled_mask_box(by_id[seg.id], fw, fh))} {clean_coco_name(seg.label)}")
        return _sentence(SEGMENTATION_PREFIX, items)

    boxes = [by_id[k] for k in sorted(by_id)]
    if len(boxes) < len(segments):
        logger.debug(
            "segmentation part empty: %d segments but %d boxes (official behaviour)", len(segments), len(boxes)
        )
        return ""
    for seg, box in zip(segments, boxes):
        items.append(f"{format_box(_scaled_mask_box(box, fw, fh))} {clean_coco_name(seg.label)}")
    return _sentence(SEGMENTATION_PREFIX, items)


# ----------------------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------------------


def verbalize_detection(perception: PerceptionResult, *, corrected: bool = False) -> str:
    """The detection sentence: float32 score >= 0.5, detector order, boxes / frame size in float32.

    ``corrected`` changes nothing here (the official helper has no silent failure).
    """
    _check(perception)
    dets = perception.detections
    if not dets:
        return ""
    scores = np.asarray([d.score for d in dets], dtype=np.float32)
    keep = scores >= np.float32(DETECTION_SCORE_THRESHOLD)
    boxes = np.asarray([d.box.xyxy for d in dets], dtype=np.float32)
    scale = np.asarray(
        [perception.frame_width, perception.frame_height, perception.frame_width, perception.frame_height],
        dtype=np.float32,
    )
    items = []
    for det, box, kept in zip(dets, boxes, keep):
        if kept:
            items.append(f"{format_box([float(v) for v in box / scale])} {det.label}")
    return _sentence(DETECTION_PREFIX, items)


# ----------------------------------------------------------------------------------------------------------
# scene graph
# ----------------------------------------------------------------------------------------------------------


def _less(a: float, b: float) -> bool:
    """NumPy's float ordering for sorting: NaN sorts last."""
    return a < b or (b != b and a == a)


def _dumb_select(v: list[float], t: list[int], base: int, num: int, kth: int) -> None:
    for i in range(kth + 1):
        minidx, minval = i, v[t[base + i]]
        for k in range(i + 1, num):
            if _less(v[t[base + k]], minval):
                minidx, minval = k, v[t[base + k]]
        t[base + i], t[base + minidx] = t[base + minidx], t[base + i]


def _median5(v: list[float], t: list[int], base: int) -> int:
    def lt(i: int, j: int) -> bool:
        return _less(v[t[base + i]], v[t[base + j]])

    def swap(i: int, j: int) -> None:
        t[base + i], t[base + j] = t[base + j], t[base + i]

    if lt(1, 0):
        swap(1, 0)
    if lt(4, 3):
        swap(4, 3)
    if lt(3, 0):
        swap(3, 0)
    if lt(4, 1):
        swap(4, 1)
    if lt(2, 1):
        swap(2, 1)
    if lt(3, 2):
        return 1 if lt(3, 1) else 3
    return 2


def _median_of_median5(v: list[float], t: list[int], base: int, num: int) -> int:
    nmed = num // 5
    for i in range(nmed):
        m = _median5(v, t, base + 5 * i)
        a, b = base + 5 * i + m, base + i
        t[a], t[b] = t[b], t[a]
    if nmed > 2:
        _introselect(v, t, base, nmed, nmed // 2)
    return nmed // 2


def _introselect(v: list[float], t: list[int], base: int, num: int, kth: int) -> None:
    """NumPy 1.26's introselect (median-of-3 quickselect, median-of-medians fallback) on t[base:base+num]."""

    def val(i: int) -> float:
        return v[t[base + i]]

    def swap(i: int, j: int) -> None:
        t[base + i], t[base + j] = t[base + j], t[base + i]

    low, high = 0, num - 1
    if kth - low < 3:
        _dumb_select(v, t, base + low, high - low + 1, kth - low)
        return
    if kth == num - 1:
        maxidx, maxval = low, val(low)
        for k in range(low + 1, num):
            if not _less(val(k), maxval):
                maxidx, maxval = k, val(k)
        swap(kth, maxidx)
        return
    depth_limit = (num.bit_length() - 1) * 2
    while low + 1 < high:
        ll, hh = low + 1, high
        if depth_limit > 0 or hh - ll < 5:
            mid = low + (high - low) // 2
            if _less(val(high), val(mid)):
                swap(high, mid)
            if _less(val(high), val(low)):
                swap(high, low)
            if _less(val(low), val(mid)):
                swap(low, mid)
            swap(mid, low + 1)
        else:
            mid = ll + _median_of_median5(v, t, base + ll, hh - ll)
            swap(mid, low)
            ll -= 1
            hh += 1
        depth_limit -= 1
        pivot = val(low)
        while True:
            ll += 1
            while _less(val(ll), pivot):
                ll += 1
            hh -= 1
            while _less(pivot, val(hh)):
                hh -= 1
            if hh < ll:
                break
            swap(ll, hh)
        swap(low, hh)
        if hh >= kth:
            high = hh - 1
        if hh <= kth:
            low = ll
    if high == low + 1 and _less(val(high), val(low)):
        swap(high, low)


def argpartition_numpy126(values: Sequence[float], kth: int) -> np.ndarray:
    """``numpy.argpartition(values, kth)`` for a 1-D array exactly as NumPy 1.26 computes it.

    NumPy 1.26 used a portable introselect for every CPU; NumPy 2 may use SIMD selection with a different
    (equally valid) order. The official verbalization's relation order depends on it. ``kth`` may be
    negative; raises :class:`InputError` when it is out of bounds (NumPy raises ``ValueError``).
    """
    v = [float(x) for x in values]
    n = len(v)
    k = kth + n if kth < 0 else kth
    if not 0 <= k < n:
        raise InputError(f"kth {kth} out of bounds for {n} values")
    t = list(range(n))
    _introselect(v, t, 0, n, k)
    return np.asarray(t, dtype=np.int64)


def select_relations(scores: Sequence[float], num_objects: int, *, corrected: bool = False) -> list[int]:
    """Indices of the relation rows the official helper verbalizes, in its order.

    k = min(10, ``num_objects``); the k largest float32 scores in NumPy 1.26 ``argpartition`` order, kept if
    >= 0.8. With fewer rows than k (or no objects) the official helper fails and nothing is kept;
    ``corrected=True`` then takes all rows, and orders the chosen rows by descending score (ties: row order).
    """
    s = np.asarray(scores, dtype=np.float32)
    n = int(s.shape[0])
    k = min(SCENE_GRAPH_MAX_RELATIONS, int(num_objects))
    thr = np.float32(SCENE_GRAPH_SCORE_THRESHOLD)
    if corrected:
        order = sorted(range(n), key=lambda i: (-float(s[i]), i))[:k]
        return [i for i in order if s[i] >= thr]
    if k == 0 or k > n:
        return []
    top = argpartition_numpy126(s, -k)[-k:]
    return [int(i) for i in top if s[i] >= thr]


def verbalize_scene_graph(perception: PerceptionResult, *, corrected: bool = False) -> str:
    """The scene-graph sentence (see the module docstring)."""
    _check(perception)
    objects = perception.scene_graph_objects
    relations = perception.relations
    names = number_duplicates([clean_coco_name(o.label) for o in objects])
    chosen = select_relations([r.score for r in relations], len(objects), corrected=corrected)
    items = []
    for i in chosen:
        rel = relations[i]
        items.append(f"{names[rel.subject_index]} is {rel.predicate} {names[rel.object_index]}")
    return _sentence(SCENE_GRAPH_PREFIX, items)


# ----------------------------------------------------------------------------------------------------------
# OCR
# ----------------------------------------------------------------------------------------------------------


def verbalize_ocr(perception: PerceptionResult, *, corrected: bool = False) -> str:
    """The OCR sentence: lines with confidence >= 0.85, in OCR order, texts joined unescaped.

    ``corrected`` changes nothing here; "no text" (PaddleOCR's ``None``) is an empty list and gives ``''``.
    """
    _check(perception)
    texts = [line.text for line in perception.text_lines if line.confidence >= OCR_CONFIDENCE_THRESHOLD]
    return _sentence(OCR_PREFIX, texts)


# ----------------------------------------------------------------------------------------------------------
# all parts
# ----------------------------------------------------------------------------------------------------------


def _check(perception: Optional[PerceptionResult]) -> None:
    if not isinstance(perception, PerceptionResult):
        raise InputError(f"verbalization needs a moai_sdk.PerceptionResult; got {type(perception).__name__}")


def verbalize_parts(perception: PerceptionResult, corrected: bool = False) -> VerbalizationParts:
    """The four parts for one image.

    ``corrected=True`` differs from the official helpers in exactly these points:

    * segmentation: each segment gets the box of its *own* id (not the box at its list position), and a
      segment without pixels is dropped alone instead of emptying the whole part;
    * scene graph: with fewer relation rows than k = min(10, #objects) the rows scoring >= 0.8 are still
      verbalized (officially the part is empty), and the chosen rows are ordered by descending score
      instead of ``argpartition`` order.

    Detection and OCR are identical in both modes.
    """
    _check(perception)
    return VerbalizationParts(
        segmentation=verbalize_segmentation(perception, corrected=corrected),
        detection=verbalize_detection(perception, corrected=corrected),
        scene_graph=verbalize_scene_graph(perception, corrected=corrected),
        ocr=verbalize_ocr(perception, corrected=corrected),
    )


def verbalize(perception: PerceptionResult, *, corrected: bool = False) -> str:
    """The auxiliary text for one image: the four parts joined by single spaces (``'   '`` when empty)."""
    return verbalize_parts(perception, corrected=corrected).text


__all__ = [
    "EMPTY_VERBALIZATION",
    "VerbalizationParts",
    "verbalize",
    "verbalize_parts",
    "verbalize_segmentation",
    "verbalize_detection",
    "verbalize_scene_graph",
    "verbalize_ocr",
    "join_parts",
    "format_box",
    "format_coordinate",
    "number_duplicates",
    "select_relations",
    "argpartition_numpy126",
    "SEGMENTATION_PREFIX",
    "DETECTION_PREFIX",
    "SCENE_GRAPH_PREFIX",
    "OCR_PREFIX",
    "DETECTION_SCORE_THRESHOLD",
    "SCENE_GRAPH_SCORE_THRESHOLD",
    "SCENE_GRAPH_MAX_RELATIONS",
    "OCR_CONFIDENCE_THRESHOLD",
]
