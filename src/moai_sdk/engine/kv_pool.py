"""The KV pool: one batched key/value cache whose rows are the running requests, under a memory budget.

Layout: every decoder layer holds keys and values ``[slots, kv_heads, capacity, head_dim]``; running rows occupy
slots ``0 .. n-1`` (compacted: when a row leaves, the last row moves into its slot -- one row's copy), each row's
keys left-aligned from position 0 without holes, so a decoding step runs on the views ``[:n]`` with each row's own
length (:meth:`~moai_sdk.modeling.MoAIForCausalLM.decode_rows`). The alternative, a cache per row gathered into a batch
every step, copies every running row's whole cache at each step; the compacted pool copies one row's cache when a
row leaves, and its tensors keep their addresses between admissions (what CUDA graphs need).

Budget: ``budget_bytes`` bounds the *allocated* cache (slots x capacity x bytes per position), which is what the
device really holds -- rows are padded to the longest reservation. A request is admitted only when its reservation
(context positions + ``max_new_tokens``) fits together with the running rows' and ``max_num_seqs`` allows another
row, so nothing can run out of memory mid-answer. The pool grows (geometrically in slots, in 64-position steps in
capacity, never past the budget) and keeps its size for the next rows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import ConfigError
from ..modeling.internlm2 import KVCache, LayerCache

logger = logging.getLogger(__name__)

#: The pool's capacity grows in steps of this many positions.
CAPACITY_STEP = 64
#: Default KV budget off CUDA (bytes); on CUDA the default is a fraction of the free memory.
DEFAULT_CPU_KV_BUDGET = 4 * 2**30
DEFAULT_CUDA_KV_FRACTION = 0.5


def bytes_per_position(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one position in every layer."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * size


def resolve_budget(budget: Union[int, float, None], device: torch.device) -> int:
    """Bytes for the KV pool: an int is bytes; a float in (0, 1] a fraction of the free CUDA memory (of the
    default budget elsewhere); ``None`` the default."""
    if isinstance(budget, bool):
        raise ConfigError(f"kv_budget must be bytes (int) or a fraction (float in (0, 1]); got {budget!r}")
    if budget is None:
        budget = DEFAULT_CUDA_KV_FRACTION if device.type == "cuda" else DEFAULT_CPU_KV_BUDGET
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"kv_budget as a fraction must be in (0, 1]; got {budget}")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * budget)
        return int(DEFAULT_CPU_KV_BUDGET * budget)
    if not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"kv_budget must be a positive number of bytes or a fraction; got {budget!r}")
    return budget


@dataclass
class _Shape:
    slots: int
    capacity: int

    def bytes(self, per_position: int) -> int:
        return self.slots * self.capacity * per_position


class KVPool:
    """Slots of one batched KV cache for the running rows (module docstring)."""

    def __init__(
        self, config: Any, dtype: torch.dtype, device: torch.device, *, budget_bytes: int, max_num_seqs: int
    ) -> None:
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1; got {max_num_seqs}")
        self.config, self.dtype, self.device = config, dtype, device
        self.budget_bytes = int(budget_bytes)
        self.max_num_seqs = int(max_num_seqs)
        self.per_position = bytes_per_position(config, dtype)
        self.layers: list[LayerCache] = []
        self.shape = _Shape(0, 0)
        self.lengths: list[int] = []  # cached positions of each used slot
        self.reserved: list[int] = []  # positions reserved by each used slot
        #: bumped whenever the tensors are reallocated (CUDA graphs captured on the old ones are stale)
        self.version = 0

    # --- accounting ------------------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return len(self.lengths)

    @property
    def allocated_bytes(self) -> int:
        return self.shape.bytes(self.per_position)

    @property
    def reserved_bytes(self) -> int:
        """Bytes the running rows may fill (their reservations)."""
        return sum(self.reserved) * self.per_position

    @property
    def used_bytes(self) -> int:
        """Bytes holding cached keys/values now."""
        return sum(self.lengths) * self.per_position

    def max_positions(self) -> int:
        """The longest reservation one row alone may have under the budget."""
        return self.budget_bytes // self.per_position

    def _target(self, rows: int, longest: int) -> Optional[_Shape]:
        """The shape to hold ``rows`` rows of up to ``longest`` positions, within the budget (None: no room)."""
        need_cap = max(self.shape.capacity, math.ceil(longest / CAPACITY_STEP) * CAPACITY_STEP)
        need_slots = max(self.shape.slots, rows)
        if need_slots > self.shape.slots:  # grow geometrically, as far as the budget allows
            grown = min(self.max_num_seqs, max(need_slots, 2 * self.shape.slots))
            for slots in (grown, need_slots):
                if _Shape(slots, need_cap).bytes(self.per_position) <= self.budget_bytes:
                    return _Shape(slots, need_cap)
        if _Shape(need_slots, need_cap).bytes(self.per_position) <= self.budget_bytes:
            return _Shape(need_slots, need_cap)
        exact = _Shape(need_slots, longest)  # no rounding when that alone fits
        if self.shape.capacity <= longest and exact.bytes(self.per_position) <= self.budget_bytes:
            return exact
        return None

    def fits(self, positions: int, rows: int = 1, pending: Sequence[int] = ()) -> bool:
        """Whether ``rows`` more rows reserving ``positions`` each can be admitted now, after rows already
        decided on but not allocated yet (``pending``: their reservations)."""
        count = self.used + len(pending) + rows
        if count > self.max_num_seqs:
            return False
        longest = max([positions, *self.reserved, *pending])
        return self._target(count, longest) is not None

    def fits_alone(self, positions: int, rows: int = 1) -> bool:
        """Whether such rows could ever be admitted (into an empty pool)."""
        if rows > self.max_num_seqs:
            return False
        return _Shape(rows, positions).bytes(self.per_position) <= self.budget_bytes

    # --- slots -------------------------------------------------------------------------------------------------
    def allocate(self, positions: int) -> int:
        """Reserve a slot for a row of up to ``positions`` positions (call :meth:`fits` first); returns the slot."""
        longest = max([positions, *self.reserved])
        target = self._target(self.used + 1, longest)
        if target is None or self.used + 1 > self.max_num_seqs:
            raise ConfigError(f"no room in the KV pool for {positions} positions (check fits() first)")
        if target.slots > self.shape.slots or target.capacity > self.shape.capacity:
            self._grow(target)
        self.lengths.append(0)
        self.reserved.append(int(positions))
        return self.used - 1

    def _grow(self, target: _Shape) -> None:
        shape = (target.slots, self.config.num_key_value_heads, target.capacity, self.config.head_dim)
        old, n, old_cap = self.layers, self.used, self.shape.capacity
        layers = []
        for i in range(self.config.num_hidden_layers):
            key = torch.zeros(shape, dtype=self.dtype, device=self.device)
            value = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if n and old:
                key[:n, :, :old_cap] = old[i].key[:n]
                value[:n, :, :old_cap] = old[i].value[:n]
            layers.append(LayerCache(key, value))
        self.layers = []  # drop the old tensors before the next allocation
        self.layers, self.shape = layers, target
        self.version += 1
        logger.debug(
            "KV pool: %d slots x %d positions (%.1f MiB)", target.slots, target.capacity, self.allocated_bytes / 2**20
        )

    def row_cache(self, slot: int) -> KVCache:
        """A one-row :class:`KVCache` viewing ``slot`` (a prefill writes the row's keys/values through it)."""
        return KVCache([LayerCache(lc.key[slot : slot + 1], lc.value[slot : slot + 1]) for lc in self.layers])

    def batch_cache(self, rows: Optional[int] = None) -> KVCache:
        """A :class:`KVCache` viewing the first ``rows`` slots (default: the used ones)."""
        n = self.used if rows is None else rows
        return KVCache([LayerCache(lc.key[:n], lc.value[:n]) for lc in self.layers])

    def copy_row(self, src: int, dst: int, length: Optional[int] = None) -> None:
        """Copy the first ``length`` cached positions (default: ``src``'s) of slot ``src`` into ``dst``."""
        n = self.lengths[src] if length is None else length
        for lc in self.layers:
            lc.key[dst, :, :n] = lc.key[src, :, :n]
            lc.value[dst, :, :n] = lc.value[src, :, :n]
        self.lengths[dst] = n

    def free(self, slots: list[int]) -> list[tuple[int, int]]:
        """Release ``slots``; the last rows move into the holes. Returns the moves ``(from, to)``."""
        moves = []
        for slot in sorted(set(slots), reverse=True):
            last = self.used - 1
            if slot != last:
                self.copy_row(last, slot)
                self.reserved[slot] = self.reserved[last]
                moves.append((last, slot))
            self.lengths.pop()
            self.reserved.pop()
        return moves

    def release_memory(self) -> None:
        """Drop the tensors when no row runs (the next admission allocates again)."""
        if self.used == 0 and self.layers:
            self.layers, self.shape = [], _Shape(0, 0)
            self.version += 1


__all__ = ["KVPool", "bytes_per_position", "resolve_budget", "CAPACITY_STEP", "DEFAULT_CPU_KV_BUDGET"]
