"""``RequestBatcher``: one-request calls that arrive together are answered in one batch.

On a CPU a decoding step costs about as much for eight rows as for one (it is spent reading the weights), so
callers in threads of their own (LangChain's ``batch``, a LlamaIndex query engine, an async server) that each ask
for one answer compete for the cores one row at a time unless someone gathers them (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cliper_integrations.core.engine import GenerationRequest, GenerationResult


@dataclass(eq=False)
class _Call:
    """A request waiting for its answer; ``blocking`` when its caller's thread waits for it (``answer``), not an
    event loop (``aanswer``)."""

    request: GenerationRequest
    blocking: bool
    future: Future[GenerationResult] = field(default_factory=Future)


class RequestBatcher:
    """Answers single requests, from any thread or event loop, in batches of the requests waiting together.

    The oldest waiting call leads: it waits up to ``window`` seconds for others (less once ``max_rows`` wait),
    answers the ``max_rows`` oldest with one ``answer_batch`` on its own thread, and hands the lead to the oldest
    call still waiting. So batches run one at a time, and a lone call runs on its caller's thread, as it would
    without the batcher: torch computes slower on a thread other than the one that ran it so far, because each
    thread gets an OpenMP pool of its own (docs/performance.md). An async call holds no thread while it waits;
    when the lead falls to one, a leader thread of the batcher's leads for it, so any number of async calls can
    share a batch. Every caller gets its own result or error: a batch that raises is answered again row by row,
    so one request's failure reaches only its caller.
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
        self._waiting: list[_Call] = []
        self._leader: _Call | None = None
        self._running = False  # the leader's batch is being answered: the lead stays with it until it ends
        self._leads_for_async_calls = False
        self._inside = threading.local()

    def answer(self, request: GenerationRequest) -> GenerationResult:
        """The result of ``request``, answered with whatever calls arrive with it; blocks until it is ready."""
        if getattr(self._inside, "batch", False):  # asked from inside a batch (a memory that generates)
            return self.answer_batch([request])[0]
        call = self._enqueue(request, blocking=True)
        try:
            with self._changed:
                self._changed.wait_for(lambda: call.future.done() or self._leader is call)
                leads = not call.future.done()  # else a batch led by another call answered it
                if leads:
                    self._running = True
            if leads:
                self._lead()
        except BaseException:  # interrupted (KeyboardInterrupt): the others must not wait for this call's lead
            self._withdraw(call)
            raise
        return call.future.result()

    async def aanswer(self, request: GenerationRequest) -> GenerationResult:
        """``answer`` for async callers: awaits the result without holding a thread. A cancelled call that no
        batch has taken yet leaves the queue; one already taken is decoded until its request's ``cancelled`` is set
        (``CLIPerEngine.agenerate`` sets it) and its result dropped."""
        call = self._enqueue(request, blocking=False)
        try:
            return await asyncio.wrap_future(call.future)
        except asyncio.CancelledError:
            self._withdraw(call)
            raise

    def _enqueue(self, request: GenerationRequest, blocking: bool) -> _Call:
        call = _Call(request, blocking)
        with self._changed:
            self._waiting.append(call)
            if self._leader is None:
                self._hand_over_lead()
            else:
                self._changed.notify_all()  # a leader waiting for max_rows counts again
        return call

    def _lead(self) -> None:
        """Answer the oldest waiting calls; the caller has claimed the lead (``_running``)."""
        taken: list[_Call] = []
        try:
            with self._changed:
                self._changed.wait_for(lambda: len(self._waiting) >= self.max_rows, timeout=self.window)
                taken, self._waiting = self._waiting[: self.max_rows], self._waiting[self.max_rows :]
            # a call cancelled meanwhile is dropped; a taken one can no longer be cancelled
            taken = [call for call in taken if call.future.set_running_or_notify_cancel()]
            self._inside.batch = True
            if taken:
                self._answer(taken)
        except BaseException as error:  # interrupted: no caller of this batch may wait for ever
            for call in taken:
                if not call.future.done():
                    call.future.set_exception(error)
            raise
        finally:
            self._inside.batch = False
            with self._changed:
                self._running = False
                self._hand_over_lead()

    def _lead_for_async_calls(self) -> None:
        """The leader thread's loop: lead while the lead is an async call's."""
        try:
            while True:
                with self._changed:
                    if self._leader is None or self._leader.blocking:
                        self._leads_for_async_calls = False
                        return
                    self._running = True
                self._lead()
        except BaseException:
            with self._changed:
                self._leads_for_async_calls = False
            raise

    def _withdraw(self, call: _Call) -> None:
        """Take an interrupted or cancelled call out of the queue, and out of the lead if it has it."""
        with self._changed:
            self._waiting = [waiting for waiting in self._waiting if waiting is not call]
            if self._leader is call and not self._running:
                self._hand_over_lead()

    def _hand_over_lead(self) -> None:
        """The oldest waiting call leads next, if any waits (called holding the lock); an async call's lead is
        taken by the leader thread, started if it is not running."""
        self._leader = self._waiting[0] if self._waiting else None
        if self._leader is not None and not self._leader.blocking and not self._leads_for_async_calls:
            self._leads_for_async_calls = True
            threading.Thread(target=self._lead_for_async_calls, name="cliper-batch-leader", daemon=True).start()
        self._changed.notify_all()

    def _answer(self, batch: list[_Call]) -> None:
        try:
            results = self.answer_batch([call.request for call in batch])
        except Exception as error:
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            for call in batch:
                self._answer([call])
            return
        for call, result in zip(batch, results, strict=True):
            call.future.set_result(result)
