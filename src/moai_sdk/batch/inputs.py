"""What ``moai batch`` reads: a folder of images, a JSONL/CSV/Parquet manifest, or a video sampled every N seconds.

Every reader yields :class:`BatchItem` rows -- an ``id`` (a string, unique in the input), the image *source*
(a path, an ``http(s)`` URL, encoded bytes or an RGB array for video frames), the prompt, and the manifest's
other columns, which are carried through to the output unchanged (e.g. a ``label`` column for ``moai score``).
Images are not decoded here: decoding happens in the runner, per row, so one unreadable image becomes one error
row instead of stopping the run.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError, import_optional

logger = logging.getLogger(__name__)

#: File suffixes read as images when INPUT is a folder (searched recursively).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: File suffixes read as a video (with PyAV).
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})
#: Manifest suffixes and their format.
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
#: Columns every output row has; a manifest column of the same name would be overwritten, so it is refused.
OUTPUT_COLUMNS = ("id", "prompt", "answer", "verbalization", "token_counts", "timings", "error")
#: The optional output column written with ``save_perception``.
PERCEPTION_COLUMN = "perception"

ImageSource = Union[str, bytes, np.ndarray]


@dataclass
class BatchItem:
    """One input row: ``image`` is a path or URL (str), encoded image bytes, or an RGB uint8 array (H, W, 3)."""

    id: str
    image: ImageSource
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchInputs:
    """The rows of one input, with what kind of input it was and how many rows it has (``None``: not known
    before reading, e.g. a video whose duration the container does not state)."""

    kind: str
    source: Path
    total: Optional[int]
    _rows: Any

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self._rows())


def input_kind(path: Union[str, Path]) -> str:
    """``"folder"``, ``"jsonl"``, ``"csv"``, ``"parquet"`` or ``"video"`` for INPUT, or :class:`InputError`."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise InputError(
            f"input not found: {str(p)!r} (give a folder of images, a .jsonl/.csv/.parquet manifest or a video)"
        )
    suffix = p.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return MANIFEST_SUFFIXES[suffix]
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise InputError(
        f"cannot tell what {str(p)!r} is from its suffix {suffix!r}: give a folder of images, a manifest "
        f"({', '.join(sorted(MANIFEST_SUFFIXES))}) or a video ({', '.join(sorted(VIDEO_SUFFIXES))})"
    )


def read_inputs(
    path: Union[str, Path],
    *,
    prompt: Optional[str] = None,
    every: Optional[float] = None,
    id_column: str = "id",
    image_column: str = "image",
    prompt_column: str = "prompt",
) -> BatchInputs:
    """Open INPUT for ``moai batch``.

    * a folder: every image below it (sorted); ``id`` = the path relative to the folder; ``prompt`` is required;
    * a manifest (``.jsonl``, ``.csv``, ``.parquet``): one row per record with ``image`` (a path relative to the
      manifest's folder or absolute, an ``http(s)`` URL, a ``data:`` URL or plain base64), ``id`` (default: the
      row number) and ``prompt`` (default: ``prompt``); other columns are carried to the output;
    * a video: one frame every ``every`` seconds (default 1), ``id`` = the timestamp in seconds (``"12.000"``),
      with ``timestamp`` (the sampled time) and ``frame_time`` (the decoded frame's time) carried.
    """
    p = Path(path)
    kind = input_kind(p)
    if every is not None and kind != "video":
        raise InputError(f"--every samples videos; {str(p)!r} is a {kind} input")
    if kind == "folder":
        if not prompt:
            raise InputError("a folder of images needs --prompt TEXT (the question asked about every image)")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {str(p)!r}")
        items = [BatchItem(f.relative_to(p).as_posix(), str(f), prompt) for f in files]
        return BatchInputs(kind, p, len(items), lambda: items)
    if kind == "video":
        if every is None:
            every = 1.0
        if not (isinstance(every, (int, float)) and math.isfinite(every) and every > 0):
            raise InputError(f"--every must be a positive number of seconds; got {every!r}")
        if not prompt:
            raise InputError("a video needs --prompt TEXT (the question asked about every sampled frame)")
        total = _video_frame_count(p, every)
        return BatchInputs(kind, p, total, lambda: _video_items(p, every, prompt))
    records = _read_manifest(p, kind)
    items = _manifest_items(records, p, prompt, id_column, image_column, prompt_column)
    return BatchInputs(kind, p, len(items), lambda: items)


# ------------------------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------------------------


def _read_manifest(path: Path, kind: str) -> list[dict[str, Any]]:
    """The records of a JSONL, CSV or Parquet manifest as dicts."""
    if kind == "jsonl":
        records = []
        with path.open("r", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path.name} line {number} is not valid JSON: {exc}") from exc
                if not isinstance(record, dict):
                    raise InputError(f"{path.name} line {number} must be a JSON object; got {type(record).__name__}")
                records.append(record)
        return records
    if kind == "csv":
        with path.open("r", encoding="utf-8", newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    pq = import_optional("pyarrow.parquet", "reading a Parquet manifest needs pyarrow: pip install 'moai-sdk[parquet]'")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise InputError(f"cannot read {str(path)!r} as Parquet: {type(exc).__name__}: {exc}") from exc


def _manifest_items(
    records: list[dict[str, Any]],
    path: Path,
    prompt: Optional[str],
    id_column: str,
    image_column: str,
    prompt_column: str,
) -> list[BatchItem]:
    if not records:
        raise InputError(f"the manifest {str(path)!r} has no rows")
    columns = set().union(*(r.keys() for r in records))
    if image_column not in columns:
        raise InputError(
            f"the manifest {path.name} has no {image_column!r} column (columns: {sorted(columns)}); "
            "name the image column with --image-column"
        )
    clashes = sorted(
        c for c in columns - {id_column, image_column, prompt_column} if c in (*OUTPUT_COLUMNS, PERCEPTION_COLUMN)
    )
    if clashes:
        raise InputError(
            f"the manifest column(s) {clashes} clash with output columns of moai batch; rename them "
            "(e.g. a ground-truth 'answer' column to 'label', which moai score reads)"
        )
    items: list[BatchItem] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        raw_id = record.get(id_column)
        item_id = str(index) if raw_id is None or raw_id == "" else str(raw_id)
        if item_id in seen:
            raise InputError(f"the manifest has the id {item_id!r} twice; ids must be unique (resume relies on them)")
        seen.add(item_id)
        row_prompt = record.get(prompt_column)
        if row_prompt is None or row_prompt == "":
            row_prompt = prompt
        if not row_prompt:
            raise InputError(
                f"row {item_id!r} has no {prompt_column!r} value and no --prompt was given; add a prompt column "
                "or pass --prompt TEXT"
            )
        extra = {k: v for k, v in record.items() if k not in (id_column, image_column, prompt_column)}
        items.append(BatchItem(item_id, image_source(record.get(image_column), path.parent), str(row_prompt), extra))
    return items


def image_source(value: Any, base: Path) -> ImageSource:
    """A manifest's ``image`` value as what the image loader takes: bytes for base64 or a ``data:`` URL (and for
    binary Parquet cells), the URL for ``http(s)``, otherwise a path (relative paths are relative to ``base``).

    A string that is neither a URL nor an existing file but decodes as base64 is taken as base64; anything else
    stays a path, so a missing file is reported by the loader as that row's error.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if value is None:
        return ""
    text = str(value).strip()
    low = text[:8].lower()
    if low.startswith(("http://", "https://")):
        return text
    if low.startswith("data:"):
        head, sep, payload = text.partition(",")
        if not sep or ";base64" not in head.lower():
            return text  # not a base64 data URL: the loader reports it
        return _b64(payload, text)
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    if len(text) < 256 and (candidate.exists() or "/" in text or "." in Path(text).name):
        return str(candidate)
    decoded = _b64(text, None)
    return decoded if isinstance(decoded, bytes) else str(candidate)


def _b64(payload: str, fallback: Optional[str]) -> Union[bytes, str]:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return fallback if fallback is not None else payload


# ------------------------------------------------------------------------------------------------------------
# video
# ------------------------------------------------------------------------------------------------------------


def _open_video(path: Path) -> Any:
    av = import_optional("av", "reading a video needs PyAV: pip install 'moai-sdk[video]'")
    try:
        return av.open(str(path))
    except Exception as exc:  # av raises its own error classes (InvalidDataError, ...)
        raise InputError(f"cannot open {str(path)!r} as a video: {type(exc).__name__}: {exc}") from exc


def _duration(container: Any, stream: Any) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # microseconds (av.time_base)
    return None


def _video_frame_count(path: Path, every: float) -> Optional[int]:
    """How many frames sampling every ``every`` seconds takes, from the stated duration (``None`` if unknown)."""
    container = _open_video(path)
    try:
        if not container.streams.video:
            raise InputError(f"{str(path)!r} has no video stream")
        duration = _duration(container, container.streams.video[0])
    finally:
        container.close()
    if duration is None:
        return None
    return int(math.floor(duration / every - 1e-9)) + 1 if duration > 0 else 0


def timestamp_id(seconds: float) -> str:
    """The row id of a video frame sampled at ``seconds``: ``"12.000"``."""
    return f"{seconds:.3f}"


def _video_items(path: Path, every: float, prompt: str) -> Iterator[BatchItem]:
    """Decode the video once, front to back; for each time ``T = k * every`` before the end of the video, yield
    the frame on screen at ``T`` (the last frame whose time is at or before ``T``)."""
    container = _open_video(path)
    eps = 1e-6
    try:
        stream = container.streams.video[0]
        end = _duration(container, stream)
        index = 0
        shown: Any = None

        def emit(frame: Any, k: int) -> BatchItem:
            target = k * every
            rgb = frame.to_ndarray(format="rgb24")
            return BatchItem(
                timestamp_id(target), rgb, prompt, {"timestamp": round(target, 6), "frame_time": float(frame.time)}
            )

        for frame in container.decode(stream):
            if frame.time is None:
                continue
            while shown is not None and index * every < float(frame.time) - eps:
                yield emit(shown, index)
                index += 1
            shown = frame
        last = float(shown.time) if shown is not None else None
        while shown is not None and index * every < (end if end is not None else last + eps) - eps:
            yield emit(shown, index)
            index += 1
    finally:
        container.close()


__all__ = [
    "BatchItem",
    "BatchInputs",
    "read_inputs",
    "input_kind",
    "image_source",
    "timestamp_id",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "OUTPUT_COLUMNS",
    "PERCEPTION_COLUMN",
]
