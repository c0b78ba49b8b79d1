"""Typed perception and pipeline results (Pydantic v2).

Everything the perception experts find is stored here in one shape, whatever backend produced it:

* :class:`Box` -- a pixel box in the *expert frame* (the 490 x 490 image the experts run on, following the
  official demo), never clipped: open-vocabulary detectors may return boxes reaching outside the image.
* :class:`Segment` -- one panoptic segment (or one scene-graph object), with its mask kept in memory.
* :class:`Detection`, :class:`Relation`, :class:`TextLine` -- detector boxes, scene-graph relations, OCR lines.
* :class:`PerceptionResult` -- all of the above for one image, JSON round-trippable and plottable.
* :class:`MoAIResult` -- the answer of the full pipeline, with the perception that fed it.

JSON: ``to_json()`` leaves out the masks, the panoptic id map and the frame image (they are large) unless
asked (``include_masks=True`` / ``include_image=True``). Masks are written as COCO compressed RLE
(``{"size": [h, w], "counts": "..."}``, column-major, readable by pycocotools); the id map and the image as
zlib-compressed base64 of the raw little-endian array with its shape and dtype. Floats are written in their
shortest round-trip form, so ``from_json(to_json(r)) == r`` holds exactly.

Vocabularies, colour tables and label cleaning live in :mod:`moai_sdk.labels` (re-exported here); pictures in
:mod:`moai_sdk.viz`, which takes a result without importing this module back.
"""

from __future__ import annotations

import base64
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Optional, Sequence

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .errors import InputError
from .gates import MixerGates
from .imageops import MOAI_IMAGE_SIZE
from .labels import clean_coco_name, load_vocab, pascal_colormap
from .viz import plot_perception

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

#: The four perception tasks, in the order the official verbalization joins them.
TASKS: tuple[str, ...] = ("segmentation", "detection", "scene_graph", "ocr")

#: Side of the frame the official demo runs the experts on.
DEFAULT_FRAME_SIZE = MOAI_IMAGE_SIZE


# ----------------------------------------------------------------------------------------------------------
# array encodings (RLE for masks, zlib+base64 for other arrays)
# ----------------------------------------------------------------------------------------------------------


def _counts_to_string(counts: Sequence[int]) -> str:
    """COCO's compact text form of RLE counts (5-bit groups, delta-coded from the third count on)."""
    out: list[str] = []
    for i, value in enumerate(counts):
        x = int(value)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _counts_from_string(text: str) -> list[int]:
    """Inverse of :func:`_counts_to_string`."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        x = 0
        shift = 0
        while True:
            if pos >= len(text):
                raise InputError("truncated RLE counts string")
            c = ord(text[pos]) - 48
            pos += 1
            x |= (c & 0x1F) << shift
            shift += 5
            if not c & 0x20:
                if c & 0x10:
                    x |= -1 << shift
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def mask_to_rle(mask: np.ndarray, *, compressed: bool = True) -> dict:
    """Encode a 2-D boolean mask as COCO RLE: ``{"size": [h, w], "counts": ...}``.

    Counts run over the column-major flattening and start with a run of zeros (possibly empty), exactly as
    pycocotools does; ``compressed=True`` gives its text form, ``False`` a list of ints.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputError(f"a mask must be 2-D (H x W); got shape {arr.shape}")
    h, w = arr.shape
    flat = arr.astype(bool).ravel(order="F")
    if flat.size == 0:
        counts: list[int] = [0]
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate(([0], change, [flat.size]))
        runs = np.diff(bounds).tolist()
        counts = ([0] + runs) if flat[0] else runs
    return {"size": [int(h), int(w)], "counts": _counts_to_string(counts) if compressed else counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode COCO RLE (compressed text or a list of counts) into a 2-D boolean mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"an RLE must be a dict with 'size' [h, w] and 'counts'; got {rle!r:.80}") from exc
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii")
    runs = _counts_from_string(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise InputError(f"RLE counts sum to {sum(runs)} but the mask has {h}x{w} = {h * w} pixels")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()


def encode_array(arr: np.ndarray) -> dict:
    """Lossless JSON form of a numeric array: zlib-compressed base64 of its little-endian bytes."""
    a = np.ascontiguousarray(arr)
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {
        "encoding": "zlib+base64",
        "dtype": le.dtype.str.lstrip("<|"),
        "shape": [int(s) for s in a.shape],
        "data": base64.b64encode(zlib.compress(le.tobytes(), 6)).decode("ascii"),
    }


def decode_array(obj: dict) -> np.ndarray:
    """Inverse of :func:`encode_array`."""
    try:
        if obj.get("encoding") != "zlib+base64":
            raise InputError(f"unknown array encoding {obj.get('encoding')!r}; expected 'zlib+base64'")
        dtype = np.dtype(obj["dtype"]).newbyteorder("<")
        shape = tuple(int(s) for s in obj["shape"])
        raw = zlib.decompress(base64.b64decode(obj["data"]))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise InputError(f"cannot decode the stored array: {exc}") from exc
    arr = np.frombuffer(raw, dtype=dtype)
    if arr.size != int(np.prod(shape)):
        raise InputError(f"stored array has {arr.size} values but shape {shape}")
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def _wants(info: SerializationInfo, key: str) -> bool:
    ctx = info.context if isinstance(info.context, dict) else {}
    return bool(ctx.get(key, False))


# --- mask ------------------------------------------------------------------------------------------------


def _validate_mask(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        return rle_to_mask(value)
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H x W); got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "biu" or (arr.size and not np.isin(arr, (0, 1)).all()):
            raise ValueError(f"a mask must be boolean (or 0/1 integers); got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _serialize_mask(value: np.ndarray, info: SerializationInfo) -> Any:
    if info.mode_is_json():
        return mask_to_rle(value) if _wants(info, "include_masks") else None
    return value


_RLE_SCHEMA = {
    "type": "object",
    "description": "COCO RLE of a boolean mask (column-major); 'counts' is COCO's compressed string or a list",
    "properties": {
        "size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "counts": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
    },
    "required": ["size", "counts"],
}

BoolMask = Annotated[
    np.ndarray,
    PlainValidator(_validate_mask),
    PlainSerializer(_serialize_mask),
    WithJsonSchema(_RLE_SCHEMA),
]

# --- panoptic id map -------------------------------------------------------------------------------------


def _validate_id_map(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        value = decode_array(value)
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"panoptic_ids must be 2-D (H x W); got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"panoptic_ids must hold integers; got dtype {arr.dtype}")
    if arr.size and (arr.min() < -1 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("panoptic_ids values must be -1 (no segment), 0 (unlabelled) or a segment id")
    return arr.astype(np.int32, copy=False)


def _serialize_array(key: str):
    def serialize(value: np.ndarray, info: SerializationInfo) -> Any:
        if info.mode_is_json():
            return encode_array(value) if _wants(info, key) else None
        return value

    return serialize


_ARRAY_SCHEMA = {
    "type": "object",
    "description": "zlib-compressed base64 of the raw little-endian array",
    "properties": {
        "encoding": {"const": "zlib+base64"},
        "dtype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "string"},
    },
    "required": ["encoding", "dtype", "shape", "data"],
}

IdMap = Annotated[
    np.ndarray,
    PlainValidator(_validate_id_map),
    PlainSerializer(_serialize_array("include_masks")),
    WithJsonSchema(_ARRAY_SCHEMA),
]

# --- frame image -----------------------------------------------------------------------------------------


def _validate_image(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        value = decode_array(value)
    arr = np.asarray(value)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frame_image must be uint8 H x W x 3 (RGB); got {arr.dtype} {arr.shape}")
    return arr


FrameImage = Annotated[
    np.ndarray,
    PlainValidator(_validate_image),
    PlainSerializer(_serialize_array("include_image")),
    WithJsonSchema(_ARRAY_SCHEMA),
]


def _arrays_equal(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


class _Model(BaseModel):
    """Shared configuration: frozen-free, strict on unknown keys, numpy-aware equality."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants", validate_assignment=True)

    def __eq__(self, other: object) -> bool:  # numpy arrays make the pydantic default ambiguous
        if type(self) is not type(other):
            return NotImplemented
        for name in type(self).model_fields:
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not _arrays_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


class _Document(_Model):
    """A top-level result: JSON out and back (masks and the frame image only when asked), and its schema."""

    def to_json(self, include_masks: bool = False, *, include_image: bool = False, indent: Optional[int] = None) -> str:
        """Serialise to JSON. Masks (COCO RLE) and ``panoptic_ids`` only with ``include_masks=True``; the
        frame image only with ``include_image=True``. Floats round-trip exactly."""
        return self.model_dump_json(
            indent=indent, context={"include_masks": include_masks, "include_image": include_image}
        )

    @classmethod
    def from_json(cls, text: str | bytes):
        """Parse :meth:`to_json` output; raises :class:`InputError` on malformed input."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise InputError(f"not a valid {cls.__name__} JSON: {exc}") from exc

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON schema of :meth:`to_json` output."""
        return cls.model_json_schema(mode="serialization")


# ----------------------------------------------------------------------------------------------------------
# result types
# ----------------------------------------------------------------------------------------------------------


class Box(_Model):
    """Axis-aligned pixel box ``(x0, y0, x1, y1)`` in a frame of ``frame_width x frame_height`` pixels.

    Coordinates are kept as given (not clipped, not reordered): the official detector boxes can lie partly
    outside the image, and the verbalization prints them as they are.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    frame_width: int = Field(DEFAULT_FRAME_SIZE, gt=0)
    frame_height: int = Field(DEFAULT_FRAME_SIZE, gt=0)

    @classmethod
    def from_xyxy(
        cls, xyxy: Iterable[float], frame_width: int = DEFAULT_FRAME_SIZE, frame_height: int = DEFAULT_FRAME_SIZE
    ) -> Box:
        """Build a box from any 4-sequence (list, tuple, numpy or torch values)."""
        values = [float(v) for v in xyxy]
        if len(values) != 4:
            raise InputError(f"a box needs 4 values x0, y0, x1, y1; got {len(values)}")
        return cls(
            x0=values[0], y0=values[1], x1=values[2], y1=values[3], frame_width=frame_width, frame_height=frame_height
        )

    @classmethod
    def zero(cls, frame_width: int = DEFAULT_FRAME_SIZE, frame_height: int = DEFAULT_FRAME_SIZE) -> Box:
        """The all-zero box (what an empty mask gives)."""
        return cls(x0=0.0, y0=0.0, x1=0.0, y1=0.0, frame_width=frame_width, frame_height=frame_height)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """Pixel coordinates ``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def xyxyn(self) -> tuple[float, float, float, float]:
        """Coordinates divided by the frame width / height (float64; the verbalization uses float32)."""
        return (
            self.x0 / self.frame_width,
            self.y0 / self.frame_height,
            self.x1 / self.frame_width,
            self.y1 / self.frame_height,
        )

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Width x height, 0 for degenerate or inverted boxes."""
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Box of a mask as the official code computes it: (min col, min row, max col + 1, max row + 1);
    ``(0, 0, 0, 0)`` for an empty mask."""
    arr = np.asarray(mask, dtype=bool)
    cols = np.flatnonzero(arr.any(axis=0))
    rows = np.flatnonzero(arr.any(axis=1))
    if cols.size == 0:
        return (0, 0, 0, 0)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


class Segment(_Model):
    """One panoptic segment (also used for the scene-graph model's objects).

    ``id`` is the value of the segment in the panoptic id map, ``label`` the class name as the model's
    vocabulary spells it (e.g. ``'sky-other-merged'``), ``category_id`` its 0-based index in
    ``COCO_PANOPTIC_CLASSES``. ``box`` and ``area`` come from the mask (``area`` may be 0: a segment painted
    over entirely, which the official verbalization treats specially). ``mask`` stays in memory and enters
    JSON only with ``include_masks=True``; ``rle`` is an optional COCO RLE a backend may provide instead.
    """

    id: int = Field(ge=1)
    label: str
    category_id: int = Field(ge=0)
    isthing: bool = False
    score: Optional[float] = None
    box: Box
    area: int = Field(ge=0)
    mask: Optional[BoolMask] = None
    rle: Optional[dict] = None

    @classmethod
    def from_mask(
        cls,
        mask: np.ndarray,
        *,
        id: int,
        label: str,
        category_id: int,
        isthing: bool = False,
        score: Optional[float] = None,
        keep_mask: bool = True,
    ) -> Segment:
        """Build a segment from its boolean mask (frame = mask shape); box and area are computed."""
        m = _validate_mask(mask)
        h, w = m.shape
        box = Box.from_xyxy(mask_box(m), frame_width=w, frame_height=h)
        return cls(
            id=id,
            label=label,
            category_id=category_id,
            isthing=isthing,
            score=score,
            box=box,
            area=int(m.sum()),
            mask=m if keep_mask else None,
        )

    def get_mask(self) -> Optional[np.ndarray]:
        """The mask, decoded from ``rle`` when only that is stored; ``None`` when neither is."""
        if self.mask is not None:
            return self.mask
        if self.rle is not None:
            return rle_to_mask(self.rle)
        return None

    @property
    def clean_label(self) -> str:
        """The name the official code prints: ``-merged``, then ``-other``, then ``-stuff`` removed."""
        return clean_coco_name(self.label)


class Detection(_Model):
    """One open-vocabulary detection: ``label`` is the query text, ``label_index`` its index in the query
    list (``ADE20K_847 + IMAGENET_CLASSES`` for the official OWLv2 setup)."""

    label: str
    label_index: Optional[int] = Field(default=None, ge=0)
    score: float
    box: Box


class Relation(_Model):
    """One scene-graph relation ``subject --predicate--> object``.

    ``subject_index`` / ``object_index`` index :attr:`PerceptionResult.scene_graph_objects`; labels are raw
    COCO names; ``predicate_index`` is 0-based in ``PREDICATES`` (argmax over distribution columns 1..56,
    minus 1), ``score`` the max over those columns, ``distribution`` the whole 57-column row (column 0 = no
    relation) when known.
    """

    subject_index: int = Field(ge=0)
    object_index: int = Field(ge=0)
    subject_label: str
    object_label: str
    predicate: str
    predicate_index: int = Field(ge=0)
    score: float
    distribution: Optional[list[float]] = None


class TextLine(_Model):
    """One OCR line: text, recogniser confidence, the detector polygon (pixel points) and its bounding box."""

    text: str
    confidence: float
    polygon: list[tuple[float, float]] = Field(default_factory=list)
    box: Box

    @classmethod
    def from_polygon(
        cls,
        text: str,
        confidence: float,
        polygon: Iterable[Iterable[float]],
        frame_width: int = DEFAULT_FRAME_SIZE,
        frame_height: int = DEFAULT_FRAME_SIZE,
    ) -> TextLine:
        """Build a line from its polygon; the box is the polygon's min/max extent."""
        pts = [(float(p[0]), float(p[1])) for p in (list(q) for q in polygon)]
        if not pts:
            box = Box.zero(frame_width, frame_height)
        else:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = Box(
                x0=min(xs), y0=min(ys), x1=max(xs), y1=max(ys), frame_width=frame_width, frame_height=frame_height
            )
        return cls(text=text, confidence=float(confidence), polygon=pts, box=box)


_TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "segmentation": ("segments", "panoptic_ids"),
    "detection": ("detections",),
    "scene_graph": ("scene_graph_objects", "relations"),
    "ocr": ("text_lines",),
}


class PerceptionResult(_Document):
    """Everything the perception experts found in one image.

    ``image_width`` / ``image_height`` are the original image size; ``frame_width`` / ``frame_height`` the
    frame the experts ran on (490 x 490 after the official resize), which all boxes, masks and the id map use.
    ``panoptic_ids`` holds -1 where no segment exists at all (empty segmentation), 0 for unlabelled pixels and
    k for :attr:`Segment.id` k. ``sources`` maps each task that ran to its expert name; ``timings`` gives
    seconds per expert; ``warnings`` collects what went wrong without stopping the run. ``frame_image``
    optionally keeps the RGB frame the experts saw (for plotting).
    """

    image_width: int = Field(gt=0)
    image_height: int = Field(gt=0)
    frame_width: int = Field(DEFAULT_FRAME_SIZE, gt=0)
    frame_height: int = Field(DEFAULT_FRAME_SIZE, gt=0)
    segments: list[Segment] = Field(default_factory=list)
    panoptic_ids: Optional[IdMap] = None
    detections: list[Detection] = Field(default_factory=list)
    scene_graph_objects: list[Segment] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list)
    text_lines: list[TextLine] = Field(default_factory=list)
    sources: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    frame_image: Optional[FrameImage] = None

    @field_validator("sources")
    @classmethod
    def _known_tasks(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in sources; tasks are {list(TASKS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PerceptionResult:
        frame = (self.frame_height, self.frame_width)
        if self.panoptic_ids is not None and self.panoptic_ids.shape != frame:
            raise ValueError(f"panoptic_ids has shape {self.panoptic_ids.shape}, the frame is {frame} (H, W)")
        if self.frame_image is not None and self.frame_image.shape[:2] != frame:
            raise ValueError(f"frame_image has shape {self.frame_image.shape[:2]}, the frame is {frame} (H, W)")
        for seg in list(self.segments) + list(self.scene_graph_objects):
            if seg.mask is not None and seg.mask.shape != frame:
                raise ValueError(f"segment {seg.id} mask has shape {seg.mask.shape}, the frame is {frame}")
        n = len(self.scene_graph_objects)
        for rel in self.relations:
            if rel.subject_index >= n or rel.object_index >= n:
                raise ValueError(
                    f"relation {rel.subject_label!r} -> {rel.object_label!r} indexes object "
                    f"{max(rel.subject_index, rel.object_index)} but there are {n} scene_graph_objects"
                )
        return self

    # --- derived views ------------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        """Tasks this result holds (by ``sources``, or by non-empty content), in verbalization order."""
        return tuple(t for t in TASKS if self.has_task(t))

    def has_task(self, task: str) -> bool:
        """Whether this result holds ``task``: named in ``sources`` or with non-empty fields for it."""
        if task not in _TASK_FIELDS:
            raise InputError(f"unknown task {task!r}; tasks are {list(TASKS)}")
        if task in self.sources:
            return True
        for name in _TASK_FIELDS[task]:
            value = getattr(self, name)
            if value is not None and (isinstance(value, np.ndarray) or len(value) > 0):
                return True
        return False

    def panoptic_id_map(self) -> np.ndarray:
        """The panoptic id map (int32, frame-sized).

        ``panoptic_ids`` when stored; otherwise rebuilt by painting the segment masks in list order on zeros
        (all -1 when there are no segments, as an empty panoptic result is). Raises :class:`InputError` when
        segments exist but neither the map nor their masks are kept.
        """
        if self.panoptic_ids is not None:
            return self.panoptic_ids
        ids = np.full((self.frame_height, self.frame_width), -1 if not self.segments else 0, dtype=np.int32)
        for seg in self.segments:
            mask = seg.get_mask()
            if mask is None:
                raise InputError(
                    f"segment {seg.id} ({seg.label}) has no mask and no panoptic_ids are stored; "
                    "keep the masks (include_masks=True when saving) to rebuild the map"
                )
            ids[mask] = seg.id
        return ids

    def panoptic_color_map(self) -> np.ndarray:
        """The official panoptic colour map: float64 H x W x 3 in [0, 1].

        Each pixel gets the Pascal-VOC colour of its *segment id* (not its class) divided by 255; ids <= 0
        are black. The official table has 134 entries (ids 0..133); the official code would fail on a larger
        id, this method paints such pixels black and logs a warning instead.
        """
        ids = self.panoptic_id_map().astype(np.int64)
        table = pascal_colormap()
        ids = np.where(ids <= 0, 0, ids)
        over = ids >= len(table)
        if over.any():
            bad = sorted(int(v) for v in np.unique(ids[over]))
            logger.warning("segment ids %s exceed the %d-colour panoptic table; painted black", bad[:10], len(table))
            ids = np.where(over, 0, ids)
        return table[ids]

    # --- combining ----------------------------------------------------------------------------------------

    def without(self, *tasks: str) -> PerceptionResult:
        """A copy with the outputs of ``tasks`` removed (as if their experts found nothing): their verbalization
        parts become the official empty string, and without ``"segmentation"`` the panoptic map is blank."""
        update: dict[str, Any] = {}
        for task in tasks:
            if task not in _TASK_FIELDS:
                raise InputError(f"unknown task {task!r}; tasks are {list(TASKS)}")
            for name in _TASK_FIELDS[task]:
                update[name] = [] if isinstance(getattr(self, name), list) else None
        update["sources"] = {t: e for t, e in self.sources.items() if t not in tasks}
        return self.model_copy(update=update)

    def merge(self, other: PerceptionResult) -> PerceptionResult:
        """Combine two results of the same image, each holding different tasks, into a new one.

        Raises :class:`InputError` when the image or frame sizes differ or both hold the same task.
        ``sources`` and ``timings`` are united (timings of the same expert are added), warnings concatenated.
        """
        if not isinstance(other, PerceptionResult):
            raise InputError(f"can only merge a PerceptionResult; got {type(other).__name__}")
        for name in ("image_width", "image_height", "frame_width", "frame_height"):
            if getattr(self, name) != getattr(other, name):
                raise InputError(
                    f"cannot merge results of different images: {name} {getattr(self, name)} vs {getattr(other, name)}"
                )
        data: dict[str, Any] = {
            "image_width": self.image_width,
            "image_height": self.image_height,
            "frame_width": self.frame_width,
            "frame_height": self.frame_height,
        }
        for task, names in _TASK_FIELDS.items():
            mine, theirs = self.has_task(task), other.has_task(task)
            if mine and theirs:
                raise InputError(
                    f"both results hold the {task!r} task ({self.sources.get(task, '?')} and "
                    f"{other.sources.get(task, '?')}); run one expert per task"
                )
            src = other if theirs else self
            for name in names:
                value = getattr(src, name)
                data[name] = list(value) if isinstance(value, list) else value
        data["sources"] = {**self.sources, **other.sources}
        timings = dict(self.timings)
        for key, value in other.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        data["timings"] = timings
        data["warnings"] = list(self.warnings) + [w for w in other.warnings]
        data["frame_image"] = self.frame_image if self.frame_image is not None else other.frame_image
        return PerceptionResult.model_validate(data)

    # --- pictures -----------------------------------------------------------------------------------------

    def plot(self, image: Any = None, **kwargs: Any) -> PILImage.Image:
        """Draw the result (see :func:`moai_sdk.viz.plot_perception`) and return a PIL image."""
        return plot_perception(self, image, **kwargs)

    def save(self, path: str | Path, image: Any = None, **kwargs: Any) -> Path:
        """Write the result: ``*.json`` gets :meth:`to_json` (``include_masks`` may be passed), any other
        suffix the :meth:`plot` picture in the format the suffix names (png, jpg, ...)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            include_masks = bool(kwargs.pop("include_masks", False))
            include_image = bool(kwargs.pop("include_image", False))
            if kwargs or image is not None:
                raise InputError(f"saving JSON takes only include_masks/include_image; got {sorted(kwargs)}")
            path.write_text(self.to_json(include_masks, include_image=include_image), encoding="utf-8")
        else:
            self.plot(image, **kwargs).save(path)
        return path


class TopLogprob(_Model):
    """One candidate for a generated position: its text, id, UTF-8 bytes and log-probability."""

    token: str
    token_id: int
    bytes: list[int] = Field(default_factory=list)
    logprob: float


class TokenLogprob(TopLogprob):
    """A generated token with its log-probability -- the log-softmax of the model's raw next-token distribution,
    before repetition penalty, grammar constraint and temperature (as vLLM's default) -- and the ``top_logprobs``
    most likely tokens of that distribution (``logprobs=K``; best first)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ContinuationScore(_Model):
    """How likely one continuation is after a prompt (``pipe.score``): ``logprob`` = the sum of
    ``token_logprobs`` (float32 log-softmax per token), ``is_greedy`` = greedy decoding would produce exactly
    ``token_ids``."""

    text: str
    logprob: float
    token_logprobs: list[float] = Field(default_factory=list)
    token_ids: list[int] = Field(default_factory=list)
    is_greedy: bool


class ScoreResult(_Document):
    """The scores of a prompt's continuations about one image (see :meth:`MoAIPipeline.score`)."""

    prompt: str = ""
    continuations: list[ContinuationScore] = Field(default_factory=list)
    perception: Optional[PerceptionResult] = None
    aux_text: str = ""
    token_counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    model_id: str = ""
    revision: Optional[str] = None

    def best(self) -> ContinuationScore:
        """The continuation with the highest summed log-probability."""
        if not self.continuations:
            raise InputError("this ScoreResult holds no continuations")
        return max(self.continuations, key=lambda c: c.logprob)


class MoAIResult(_Document):
    """The answer of the MoAI pipeline for one image + prompt.

    ``text`` is the generated answer, ``prompt`` the user prompt, ``aux_text`` the verbalized perception the
    model saw, ``token_counts`` the sizes of the prompt / image / aux / generated parts, ``timings`` seconds
    per stage, ``generation`` the generation settings used, ``new_token_ids`` the generated ids, ``mixer`` the
    MoAI-Mixer's gate weights when asked (``return_gates=True``; see :class:`~moai_sdk.gates.MixerGates`).
    """

    text: str
    prompt: str = ""
    perception: Optional[PerceptionResult] = None
    aux_text: str = ""
    token_counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    model_id: str = ""
    revision: Optional[str] = None
    seed: Optional[int] = None
    generation: dict[str, Any] = Field(default_factory=dict)
    new_token_ids: list[int] = Field(default_factory=list)
    mixer: Optional[MixerGates] = None
    #: With ``logprobs=K``: one entry per generated token (see :class:`TokenLogprob`).
    logprobs: Optional[list[TokenLogprob]] = None
    #: With ``response_format``: the validated Pydantic instance, the parsed JSON, or the chosen / matched text.
    parsed: Any = None
    #: Why the answer ended: ``"stop"`` (EOS, a stop string or a completed grammar) or ``"length"``.
    finish_reason: Optional[str] = None
    #: With ``n`` > 1: which choice this is (0-based); its ``seed`` is the call's seed + ``index``.
    index: int = 0

    def __str__(self) -> str:
        return self.text

    def plot_gates(self, title: Optional[str] = None, **kwargs: Any) -> PILImage.Image:
        """Per mixer layer, the two gates' shares of their six experts for this answer (see
        :meth:`MixerGates.plot`); the title defaults to the prompt."""
        if self.mixer is None:
            raise InputError("this result holds no gate weights; call the pipeline with return_gates=True")
        return self.mixer.plot(title=self.prompt if title is None else title, **kwargs)

    def _perception(self) -> PerceptionResult:
        if self.perception is None:
            raise InputError("this result holds no perception (the pipeline ran without experts); nothing to draw")
        return self.perception

    def plot(self, image: Any = None, **kwargs: Any) -> PILImage.Image:
        """Picture of the perception that fed the answer (see :meth:`PerceptionResult.plot`)."""
        return self._perception().plot(image, **kwargs)

    def save(self, path: str | Path, image: Any = None, **kwargs: Any) -> Path:
        """``*.json`` writes the whole result as JSON; other suffixes save the perception picture."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            include_masks = bool(kwargs.pop("include_masks", False))
            if kwargs or image is not None:
                raise InputError(f"saving JSON takes only include_masks; got {sorted(kwargs)}")
            path.write_text(self.to_json(include_masks), encoding="utf-8")
            return path
        return self._perception().save(path, image, **kwargs)


__all__ = [
    "TopLogprob",
    "TokenLogprob",
    "ContinuationScore",
    "ScoreResult",
    "TASKS",
    "DEFAULT_FRAME_SIZE",
    "Box",
    "Segment",
    "Detection",
    "Relation",
    "TextLine",
    "PerceptionResult",
    "MoAIResult",
    "mask_box",
    "mask_to_rle",
    "rle_to_mask",
    "encode_array",
    "decode_array",
    "clean_coco_name",
    "load_vocab",
    "pascal_colormap",
]
