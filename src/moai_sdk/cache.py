"""An LRU cache of perception-expert outputs, so that several questions about one image run the experts once.

An entry is one expert's :class:`~moai_sdk.results.PerceptionResult` for one image. Its key combines

* the content hash of the image the expert saw (SHA-256 of the uint8 frame's bytes, shape and dtype -- two
  different files that decode and resize to the same pixels share an entry), and
* :meth:`Expert.cache_key() <moai_sdk.experts.base.Expert.cache_key>`: the expert's name, model id, revision and
  settings, so changing a threshold or a checkpoint never returns stale results.

The cache only stores and returns results: the :class:`~moai_sdk.experts.base.Perception` runner looks every
frame up, runs the expert once on the frames it has not seen (as one batch) and stores what came back
(:func:`moai_sdk.experts.base.predict_cached`). The cache is thread-safe; ``max_size=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .errors import ConfigError, InputError
from .results import PerceptionResult

logger = logging.getLogger(__name__)

#: Entries kept by default (one entry = one expert's result for one image; masks included).
DEFAULT_CACHE_SIZE = 64


def image_digest(frame: torch.Tensor) -> str:
    """Content hash of an image tensor: SHA-256 over its shape, dtype and raw bytes (hex string)."""
    if not isinstance(frame, torch.Tensor):
        raise InputError(f"image_digest needs a torch tensor; got {type(frame).__name__}")
    data = frame.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(data.shape)}|{data.dtype}|".encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    """Counters of an :class:`ExpertCache`: lookups that hit / missed, entries held, capacity, evictions."""

    hits: int
    misses: int
    size: int
    max_size: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ExpertCache:
    """Thread-safe LRU of per-image expert results keyed by image content and expert configuration.

    Args:
        max_size: entries kept before the least recently used one is dropped; ``0`` disables caching.
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ConfigError(f"cache size must be an integer >= 0 (0 = off); got {max_size!r}")
        self.max_size = max_size
        self._data: OrderedDict[tuple[str, str], PerceptionResult] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    # --- plain mapping operations ------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.max_size > 0

    @staticmethod
    def make_key(expert: Union[str, Any], digest: str) -> tuple[str, str]:
        """The key of an expert's output for the image whose :func:`image_digest` is ``digest``.

        ``expert`` is the expert's configuration key (:meth:`Expert.cache_key() <moai_sdk.experts.base.Expert.cache_key>`)
        or any object with a ``cache_key()`` method.
        """
        return (expert if isinstance(expert, str) else expert.cache_key(), digest)

    def get(self, key: tuple[str, str]) -> Optional[PerceptionResult]:
        """The stored result (marked most recently used), or ``None``; counts a hit or a miss."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self._misses += 1
                return None
            self._data.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: tuple[str, str], value: PerceptionResult) -> None:
        """Store ``value`` (no-op when the cache is off), evicting the least recently used entries."""
        if not isinstance(value, PerceptionResult):
            raise InputError(f"the expert cache stores PerceptionResult objects; got {type(value).__name__}")
        if not self.enabled:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)
                self._evictions += 1

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, len(self._data), self.max_size, self._evictions)

    def __repr__(self) -> str:
        s = self.stats
        return f"ExpertCache(size={s.size}/{s.max_size}, hits={s.hits}, misses={s.misses})"


__all__ = ["ExpertCache", "CacheStats", "image_digest", "DEFAULT_CACHE_SIZE"]
