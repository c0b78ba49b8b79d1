"""Label vocabularies, colour tables and label cleaning: the names every other module prints or draws.

* :func:`load_vocab` -- the packaged label lists (COCO panoptic classes, ADE20K-847, ImageNet classes, the
  scene-graph predicates, the Pascal-VOC colour table), read once from ``moai_sdk/data``;
* :func:`pascal_colormap` -- the official panoptic colour table as floats in [0, 1];
* :func:`clean_coco_name` / :func:`number_duplicates` -- the official spelling of a class name and the
  ``name (#i)`` numbering of repeated names;
* :func:`label_colour` -- the stable box colour of a label in pictures.

A leaf module (NumPy and the standard library only): results, the verbalization and the plots all import it,
and it imports none of them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from functools import cache, lru_cache
from importlib import resources
from typing import Optional

import numpy as np

from .errors import InputError

#: The packaged vocabularies (``moai_sdk/data/<name>.json``).
VOCABULARIES: tuple[str, ...] = (
    "COCO_PANOPTIC_CLASSES",
    "ADE20K_847",
    "IMAGENET_CLASSES",
    "PREDICATES",
    "PASCAL_LABEL_COLORMAP_134",
)


@cache
def load_vocab(name: str) -> tuple:
    """Return a packaged label list (one of :data:`VOCABULARIES`) as a tuple, read once from ``moai_sdk/data``."""
    if name not in VOCABULARIES:
        raise InputError(f"unknown vocabulary {name!r}; known: {', '.join(VOCABULARIES)}")
    text = resources.files("moai_sdk").joinpath("data", f"{name}.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return tuple(tuple(x) if isinstance(x, list) else x for x in data)


@lru_cache(maxsize=1)
def pascal_colormap() -> np.ndarray:
    """The official panoptic colour table: 134 Pascal-VOC colours as float64 in [0, 1] (read-only)."""
    table = np.asarray(load_vocab("PASCAL_LABEL_COLORMAP_134"), dtype=np.int64) / 255
    table.setflags(write=False)
    return table


def clean_coco_name(name: str) -> str:
    """Official COCO-panoptic name cleanup: remove '-merged', then '-other', then '-stuff'."""
    return name.replace("-merged", "").replace("-other", "").replace("-stuff", "")


def number_duplicates(names: Sequence[str]) -> list[str]:
    """Official duplicate numbering: a name occurring more than once becomes ``name (#i)``, i counting its
    occurrences from 1 in list order; unique names stay as they are."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            out.append(f"{name} (#{seen[name]})")
        else:
            out.append(name)
    return out


#: Twenty well-separated box colours (RGB) for pictures.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 56, 56),
    (255, 157, 151),
    (255, 112, 31),
    (255, 178, 29),
    (207, 210, 49),
    (72, 249, 10),
    (146, 204, 23),
    (61, 219, 134),
    (26, 147, 52),
    (0, 212, 187),
    (44, 153, 168),
    (0, 194, 255),
    (52, 69, 147),
    (100, 115, 255),
    (0, 24, 236),
    (132, 56, 255),
    (82, 0, 133),
    (203, 56, 255),
    (255, 149, 200),
    (255, 55, 199),
)


def label_colour(label: str, index: Optional[int] = None) -> tuple[int, int, int]:
    """Stable box colour of a label: by its vocabulary index when known, else by a hash of the name."""
    key = index if index is not None else zlib.crc32(label.encode("utf-8"))
    return PALETTE[key % len(PALETTE)]


__all__ = [
    "VOCABULARIES",
    "load_vocab",
    "pascal_colormap",
    "clean_coco_name",
    "number_duplicates",
    "PALETTE",
    "label_colour",
]
