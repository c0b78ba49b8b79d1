"""The iteration-level scheduler: which prepared requests join the running batch at each engine step.

Every engine step (:class:`~moai_sdk.engine.core.MoAIEngine`) asks :meth:`Scheduler.schedule` which prepared
requests to admit, prefills them, runs one decoding step for every running row and retires the rows that ended.
Policies:

* ``"continuous"`` (default, iteration-level as Orca / vLLM): admit prepared requests in arrival order while
  ``max_num_seqs`` and the KV pool allow another row *and* the step's token budget (``max_num_batched_tokens``,
  as vLLM's: the running rows' one decode token each plus the newcomers' context positions) is not spent -- the
  first newcomer of a step is always admitted when it fits the pool, so a prompt longer than the budget still
  runs. Arrival order is kept: a request that does not fit blocks those behind it (no starvation of long ones).
* ``"static"`` -- request-level batching (what ``moai serve`` did before the engine): admit only into an empty
  batch, as many prepared requests as fit; no newcomer joins until every row of the batch has ended. Kept as the
  baseline the benchmarks compare against.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..modeling.decoding import StopCriteria, TokenConstraint, TokenLogprobs
from ..modeling.generation import GenerationSettings
from ..streaming import AnswerStream
from .kv_pool import KVPool
from .requests import EngineRequest, RequestHandle

POLICIES = ("continuous", "static")


@dataclass(eq=False)
class PreparedRequest:
    """A request whose perception, verbalization and processor inputs are ready (one row per choice)."""

    request: EngineRequest
    handles: list[RequestHandle]
    prepared: Any  # the pipeline's prepared row (prompts, perceptions, aux texts, inputs)
    timings: dict[str, float]
    context: int  # positions the prefill fills (text + image)
    ready: float = field(default_factory=time.perf_counter)  # when perception finished

    @property
    def reserve(self) -> int:
        """Positions each row may fill: the context plus ``max_new_tokens``."""
        return self.context + self.request.settings.max_new_tokens


@dataclass(eq=False)
class Row:
    """One running choice: its slot in the KV pool, its decoding state and its caller's handle."""

    handle: RequestHandle
    prepared: PreparedRequest
    settings: GenerationSettings
    slot: int
    stop: StopCriteria
    stream: AnswerStream
    generator: Optional[torch.Generator] = None
    seen: Optional[torch.Tensor] = None
    constraint: Optional[TokenConstraint] = None
    logprobs: Optional[int] = None
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    admitted: float = 0.0
    finish_reason: Optional[str] = None


class Scheduler:
    """Admission decisions over the prepared queue and the KV pool (module docstring)."""

    def __init__(
        self,
        pool: KVPool,
        *,
        policy: str = "continuous",
        max_num_batched_tokens: int = 4096,
        static_wait: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"scheduling must be one of {POLICIES}; got {policy!r}")
        if max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1; got {max_num_batched_tokens}")
        self.pool = pool
        self.policy = policy
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        #: ``static``: an empty batch waits this long (seconds, from its first prepared request or the end of the
        #: previous batch, whichever is later) for companions, as the request-level batcher did
        self.static_wait = float(static_wait)
        self.waiting: deque[PreparedRequest] = deque()
        self.running: list[Row] = []  # running[i].slot == i
        self.free_since = 0.0  # when the batch last became empty (perf_counter)

    def wait_hint(self, now: float) -> Optional[float]:
        """Seconds to wait before :meth:`schedule` should run again with nothing running (None: now)."""
        if self.policy != "static" or self.running or not self.waiting:
            return None
        if len(self.waiting) >= self.pool.max_num_seqs:
            return None
        due = max(self.waiting[0].ready, self.free_since) + self.static_wait
        return due - now if due > now else None

    def add(self, prepared: PreparedRequest) -> None:
        self.waiting.append(prepared)

    def drop(self, prepared: PreparedRequest) -> bool:
        try:
            self.waiting.remove(prepared)
            return True
        except ValueError:
            return False

    def schedule(self) -> list[PreparedRequest]:
        """The requests to admit now, in order (removed from the queue). The caller allocates their rows'
        slots (``pool.allocate``) in this order; the decision already counted them against the pool."""
        if not self.waiting or (self.policy == "static" and self.running):
            return []
        budget = self.max_num_batched_tokens - len(self.running)
        admitted: list[PreparedRequest] = []
        pending: list[int] = []
        while self.waiting:
            nxt = self.waiting[0]
            rows = len(nxt.handles)
            if not self.pool.fits(nxt.reserve, rows, pending):
                break
            if self.policy == "continuous" and admitted and nxt.context > budget:
                break
            self.waiting.popleft()
            admitted.append(nxt)
            pending.extend([nxt.reserve] * rows)
            budget -= nxt.context
        return admitted

    def retire(self, slots: list[int]) -> None:
        """Free the rows in ``slots``: the pool compacts, rows that moved get their new slot."""
        for slot in sorted(set(slots), reverse=True):
            for src, dst in self.pool.free([slot]):
                self.running[dst] = self.running[src]
                self.running[dst].slot = dst
            self.running.pop()
        if not self.running:
            self.free_since = time.perf_counter()


__all__ = ["Scheduler", "PreparedRequest", "Row", "POLICIES"]
