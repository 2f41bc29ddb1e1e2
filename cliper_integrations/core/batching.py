"""``RequestBatcher``: one-request calls that arrive together are answered in one batch.

On a CPU a decoding step costs about as much for eight rows as for one (it is spent reading the weights), so
callers in threads of their own (LangChain's ``batch``, a LlamaIndex query engine, an async server) that each ask
for one answer compete for the cores one row at a time unless someone gathers them (docs/performance.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cliper_integrations.core.engine import GenerationRequest, GenerationResult

_Waiting = tuple["GenerationRequest", "Future[GenerationResult]"]


class RequestBatcher:
    """Answers single requests, from any thread, in batches of the requests waiting together.

    The oldest waiting call leads: it waits up to ``window`` seconds for others (less once ``max_rows`` wait),
    answers the ``max_rows`` oldest with one ``answer_batch`` on its own thread, and hands the lead to the oldest
    call still waiting. So batches run one at a time, and a lone call runs on its caller's thread, as it would
    without the batcher: torch computes slower on a thread other than the one that ran it so far, because each
    thread gets an OpenMP pool of its own (docs/performance.md). Every caller gets its own result or error: a batch
    that raises is answered again row by row, so one request's failure reaches only its caller. A sampled request
    with a seed is answered alone, so its sample does not depend on which calls arrived with it.
    """

    def __init__(
        self,
        answer_batch: Callable[[Sequence[GenerationRequest]], list[GenerationResult]],
        window: float,
        max_rows: int,
    ) -> None:
        self.answer_batch = answer_batch
        self.window = window
        self.max_rows = max_rows
        self._changed = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._leader: Future[GenerationResult] | None = None
        self._inside = threading.local()

    def answer(self, request: GenerationRequest) -> GenerationResult:
        """The result of ``request``, answered with whatever calls arrive with it; blocks until it is ready."""
        if getattr(self._inside, "batch", False):  # asked from inside a batch (a memory that generates)
            return self.answer_batch([request])[0]
        future: Future[GenerationResult] = Future()
        with self._changed:
            self._waiting.append((request, future))
            self._leader = self._leader or future
            self._changed.notify_all()
        try:
            with self._changed:
                self._changed.wait_for(lambda: future.done() or self._leader is future)
            if not future.done():
                self._lead()
        except BaseException:  # interrupted (KeyboardInterrupt): the others must not wait for this call's lead
            self._withdraw(future)
            raise
        return future.result()

    def _lead(self) -> None:
        taken: list[_Waiting] = []
        try:
            with self._changed:
                self._changed.wait_for(lambda: len(self._waiting) >= self.max_rows, timeout=self.window)
                taken, self._waiting = self._waiting[: self.max_rows], self._waiting[self.max_rows :]
            self._inside.batch = True
            together = [item for item in taken if not item[0].seeded_sampling()]
            for batch in (together, *([item] for item in taken if item[0].seeded_sampling())):
                if batch:
                    self._answer(batch)
        except BaseException as error:  # interrupted: no caller of this batch may wait for ever
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            raise
        finally:
            self._inside.batch = False
            with self._changed:
                self._hand_over_lead()

    def _withdraw(self, future: Future[GenerationResult]) -> None:
        """Take an interrupted call out of the queue, and out of the lead if it has it."""
        with self._changed:
            self._waiting = [item for item in self._waiting if item[1] is not future]
            if self._leader is future:
                self._hand_over_lead()

    def _hand_over_lead(self) -> None:
        """The oldest waiting call leads next, if any waits (called holding the lock)."""
        self._leader = self._waiting[0][1] if self._waiting else None
        self._changed.notify_all()

    def _answer(self, batch: list[_Waiting]) -> None:
        try:
            results = self.answer_batch([request for request, _ in batch])
        except Exception as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            for item in batch:
                self._answer([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
