"""The perception worker: experts, verbalization and the processor of each request, ahead of admission.

One thread takes submitted requests in arrival order and runs the stages before the language model
(:meth:`MoAIPipeline.prepare <moai_sdk.pipeline.MoAIPipeline.prepare>`: the experts -- OCR alone takes ~0.4 s on
a CPU --, the verbalization, the processor) for one request at a time, exactly as a single call runs them. The
engine thread meanwhile keeps decoding the running rows, so a newcomer's experts never stall them; the prepared
request then waits in the scheduler's queue for a KV slot. The worker stays at most ``max_prepared`` requests
ahead of admission (prepared inputs hold the image tensors).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Optional

from ..modeling.generation import check_context_length
from ..pipeline import MoAIPipeline
from .requests import EngineRequest, RequestHandle
from .scheduler import PreparedRequest

logger = logging.getLogger(__name__)


class PerceptionWorker:
    """A thread that turns submitted requests into :class:`PreparedRequest` (module docstring)."""

    def __init__(
        self,
        pipe: MoAIPipeline,
        deliver: Callable[[PreparedRequest], None],
        fail: Callable[[list[RequestHandle], BaseException], None],
        *,
        room: Callable[[], bool],
        wait_room: Callable[[float], None],
    ) -> None:
        self.pipe = pipe
        self.deliver, self.fail = deliver, fail
        self.room, self.wait_room = room, wait_room
        self.queue: queue.Queue[Optional[tuple[EngineRequest, list[RequestHandle]]]] = queue.Queue()
        self.busy = False
        self._thread = threading.Thread(target=self._main, name="moai-engine-perception", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)

    def submit(self, request: EngineRequest, handles: list[RequestHandle]) -> None:
        self.queue.put((request, handles))

    @property
    def waiting(self) -> int:
        """Requests not prepared yet (queued or being prepared)."""
        return self.queue.qsize() + int(self.busy)

    def _main(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            request, handles = item
            if all(h.cancelled for h in handles):
                continue
            while not self.room():  # stay a bounded number of requests ahead of admission
                self.wait_room(0.05)
            self.busy = True
            try:
                self.deliver(self.prepare(request, handles))
            except Exception as exc:  # the request's own error (bad image, prompt too long, expert failure...)
                self.fail(handles, exc)
            finally:
                self.busy = False

    def prepare(self, request: EngineRequest, handles: list[RequestHandle]) -> PreparedRequest:
        rows, timings = self.pipe.prepare(
            request.image,
            request.prompt,
            template=request.template,
            perception=request.perception,
            experts=request.experts,
            allow_remote=request.allow_remote,
            allow_special_tokens=request.allow_special_tokens,
            max_new_tokens=request.settings.max_new_tokens,
        )
        inputs = rows.inputs
        prompt_tokens = int(inputs.attention_mask[0].sum()) - 1  # the <image> placeholder is not text
        image_tokens = int(inputs.num_image_tokens)
        check_context_length(prompt_tokens, image_tokens, request.settings.max_new_tokens, self.pipe.model.config)
        return PreparedRequest(request, handles, rows, timings, prompt_tokens + image_tokens)


__all__ = ["PerceptionWorker"]
