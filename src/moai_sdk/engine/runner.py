"""The decode runner: one decoding step for the running rows, eager or as CUDA graphs per batch size.

Eager (the default off CUDA): :meth:`~moai_sdk.modeling.MoAIForCausalLM.decode_rows` over the used slots, the
attention reading ``max(lengths) + 1`` positions.

Fixed shape (``cuda_graphs``; the default on CUDA): the step is padded to a *bucket* of rows (1, 2, 4, 8, ...,
``max_num_seqs``, as vLLM captures a few batch sizes) and reads the pool's whole capacity, the key mask and the
write positions computed on the device from a lengths tensor -- so every step of a bucket is the same sequence
of kernels. On CUDA each bucket is captured once as a CUDA graph and replayed (the kernel-launch cost of a small
decoding step is most of its time on a GPU); elsewhere the same fixed-shape steps run without a graph (which is
how the tests check them on a CPU). Padding rows use free slots with length 0 and their logits are dropped. A
pool that grows (new tensors) invalidates the graphs; they are captured again on first use.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from .kv_pool import KVPool

logger = logging.getLogger(__name__)


def buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a fixed-shape step is padded to: powers of two up to ``max_num_seqs`` (and it)."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    out.append(max_num_seqs)
    return out


class _Graph:
    """The static tensors and (on CUDA) the captured graph of one bucket."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph: Any = None
        self.logits: Optional[torch.Tensor] = None
        self.version = -1


class DecodeRunner:
    """Runs one decoding step for the first ``n`` pool slots (module docstring)."""

    def __init__(self, model: Any, pool: KVPool, *, fixed_shape: bool, use_graphs: Optional[bool] = None) -> None:
        self.model, self.pool = model, pool
        self.fixed_shape = bool(fixed_shape)
        device = pool.device
        self.use_graphs = self.fixed_shape and (device.type == "cuda" if use_graphs is None else bool(use_graphs))
        self.buckets = buckets(pool.max_num_seqs)
        self._graphs: dict[int, _Graph] = {}
        self._stream: Any = None
        self.captured = 0  # graphs captured so far (tests and logs)

    @torch.inference_mode()
    def __call__(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Float32 logits [n, vocab] of the next token of each used slot."""
        n = len(tokens)
        device = self.pool.device
        if not self.fixed_shape:
            t = torch.tensor(tokens, device=device)
            lens = torch.tensor(lengths, device=device)
            return self.model.decode_rows(t, self.pool.batch_cache(n), lens)
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or bucket > self.pool.shape.slots:
            t = torch.tensor(tokens, device=device)
            return self.model.decode_rows(t, self.pool.batch_cache(n), torch.tensor(lengths, device=device))
        g = self._graphs.get(bucket)
        if g is None:
            g = self._graphs[bucket] = _Graph(bucket, device)
        g.tokens.zero_()
        g.lengths.zero_()
        g.tokens[:n] = torch.tensor(tokens, device=device)
        g.lengths[:n] = torch.tensor(lengths, device=device)
        if not self.use_graphs:
            return self._step(g)[:n]
        if g.graph is None or g.version != self.pool.version:
            self._capture(g)
        g.graph.replay()
        return g.logits[:n]

    def _step(self, g: _Graph) -> torch.Tensor:
        capacity = self.pool.shape.capacity
        return self.model.decode_rows(g.tokens, self.pool.batch_cache(g.rows), g.lengths, kv_length=capacity)

    def _capture(self, g: _Graph) -> None:
        device = self.pool.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        self._stream.wait_stream(current)
        # the padding rows write position 0 of free slots: keep what the warm-up writes there harmless
        with torch.cuda.stream(self._stream):
            self._step(g)  # warm-up outside the capture (lazy kernel and library set-up)
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            logits = self._step(g)
        g.graph, g.logits, g.version = graph, logits, self.pool.version
        self.captured += 1
        logger.debug("captured the decoding step for %d rows (pool version %d)", g.rows, g.version)


__all__ = ["DecodeRunner", "buckets"]
