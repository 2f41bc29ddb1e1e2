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

    A call waits up to ``window`` seconds for others (less once ``max_rows`` wait). One worker thread, alive only
    while calls wait, answers them ``max_rows`` at a time with ``answer_batch``, in arrival order, so calls run one
    batch at a time instead of competing for the cores. Every caller gets its own result or error: a batch that
    raises is answered again row by row, so one request's failure reaches only its caller. A sampled request with
    a seed is answered alone, so its sample does not depend on which calls arrived with it.
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
        self._arrived = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._worker: threading.Thread | None = None

    def answer(self, request: GenerationRequest) -> GenerationResult:
        """The result of ``request``, answered with whatever calls arrive with it; blocks until it is ready."""
        if threading.current_thread() is self._worker:  # asked from inside a batch (a memory that generates)
            return self.answer_batch([request])[0]
        future: Future[GenerationResult] = Future()
        with self._arrived:
            self._waiting.append((request, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="cliper-request-batcher", daemon=True)
                self._worker.start()
            self._arrived.notify()
        return future.result()

    def _serve(self) -> None:
        taken: list[_Waiting] = []
        try:
            while True:
                with self._arrived:
                    self._arrived.wait_for(lambda: len(self._waiting) >= self.max_rows, timeout=self.window)
                    taken, self._waiting = self._waiting[: self.max_rows], self._waiting[self.max_rows :]
                together = [item for item in taken if not item[0].seeded_sampling()]
                for batch in (together, *([item] for item in taken if item[0].seeded_sampling())):
                    if batch:
                        self._answer(batch)
                with self._arrived:
                    if not self._waiting:
                        self._worker = None
                        return
        except BaseException as error:  # the worker dies (interpreter shutdown): no caller may wait for ever
            with self._arrived:
                for _, future in [*taken, *self._waiting]:
                    if not future.done():
                        future.set_exception(error)
                self._waiting, self._worker = [], None
            raise

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
