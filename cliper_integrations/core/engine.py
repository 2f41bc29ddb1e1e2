"""``CLIPerEngine``: one loaded model + classifier serving batched, streamed, per-row-guided generation.

Heavy objects (model, tokenizer, classifier) are loaded once and shared; everything that belongs to a
call (weights, the classifier's cache, stop state) lives in that call, so threads never share state.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import queue
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from transformers import Cache, DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from cliper_integrations.core.batching import RequestBatcher
from cliper_integrations.core.classifier import PreferenceClassifier
from cliper_integrations.core.errors import (
    CLIPerError,
    EmptyPromptError,
    GenerationTimeoutError,
    InvalidRequestError,
    MemoryUnavailableError,
    NoClassifierError,
    PromptTooLongError,
)
from cliper_integrations.core.logits_processor import ClassifierGuidedLogitsProcessor
from cliper_integrations.core.models import EMBEDDED_SPEC, LoadedModel, ModelDType, load_model
from cliper_integrations.core.preferences import (
    AXES,
    BACKGROUND_CLASSES,
    DEFAULT_CLASSES,
    MEASURED_WEIGHT_CAP,
    is_disclaimer,
    is_refusal,
    validate_weights,
)
from cliper_integrations.core.prompting import (
    Message,
    as_messages,
    message_dicts,
    render_chat,
    tool_results_as_question,
    with_preference_request,
)
from cliper_integrations.core.sampling import RowSamplingLogitsProcessor
from cliper_integrations.core.tools import TOOL_CALL_SPAN, check_tools_supported

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER = "default"
DEFAULT_REFUSAL_LOOKAHEAD = 6
"""Tokens drafted to see whether the base model opens with a refusal (every refusal in the training data
shows within 4 tokens of the embedded model's tokenizer)."""
DEFAULT_DISCLAIMER_LOOKAHEAD = 64
"""Tokens drafted past an opening that declines with a disclaimer ("As an AI …"): on the training side the embedded
model's refusals end within 44 tokens and its hedged answers run past 120 (docs/classifier.md, session 53). A hedged
answer is guided from these tokens on."""
DEFAULT_BATCH_WINDOW = 0.01
"""Seconds a ``generate`` call waits for others: threads a framework starts together (LangChain's ``batch``) call
within a few milliseconds of each other, and a decoding step takes tens of milliseconds or more."""
DISCLAIMER_WARNING = "The base model opens with a disclaimer and then answers"
"""How the warning of a row guided from its disclaimer draft begins (``GenerationResult.warnings``)."""
PACKAGED_CLASSIFIERS = Path(__file__).resolve().parent.parent / "classifiers"


T = TypeVar("T")


class WeightsSource(Protocol):
    """Anything that maps a user id to guidance weights (``PreferenceMemory`` does)."""

    def weights(self, user_id: str) -> dict[str, float] | None: ...


class Deadline(threading.Event):
    """A request's ``cancelled`` event that also counts as set once its ``timeout`` has passed, and while the event
    the caller gave (``also``) is set."""

    def __init__(self, seconds: float, also: threading.Event | None = None) -> None:
        super().__init__()
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.also = also

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def is_set(self) -> bool:
        return super().is_set() or (self.also is not None and self.also.is_set()) or self.expired


def _valid_timeout(seconds: object) -> bool:
    return isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 < seconds < math.inf


def with_deadline(request: GenerationRequest) -> GenerationRequest:
    """``request`` whose ``cancelled`` also counts as set once its ``timeout`` has passed from now (unchanged without
    a valid timeout, which ``_prepare`` refuses, or when a ``Deadline`` already runs for it)."""
    if not _valid_timeout(request.timeout) or isinstance(request.cancelled, Deadline):
        return request
    return replace(request, cancelled=Deadline(request.timeout, request.cancelled))


def _cancellable(request: GenerationRequest) -> GenerationRequest:
    """``request`` with a deadline (``with_deadline``) and a ``cancelled`` event to set."""
    request = with_deadline(request)
    return request if request.cancelled is not None else replace(request, cancelled=threading.Event())


async def _stopping_on_cancel(requests: Sequence[GenerationRequest], answer: Awaitable[T]) -> T:
    """``answer``'s result; if the awaiting task is cancelled, every request's ``cancelled`` is set first, so a batch
    that has taken them stops their rows at the next token instead of decoding them for no one."""
    try:
        return await answer
    except asyncio.CancelledError:
        for request in requests:
            assert request.cancelled is not None  # ``_cancellable``
            request.cancelled.set()
        raise


def stored_weights(memory: WeightsSource, user_id: str) -> dict[str, float] | None:
    """``memory``'s weights for ``user_id``; a database failure becomes ``MemoryUnavailableError``, so that it fails
    the request that asked, not the batch it is in."""
    try:
        return memory.weights(user_id)
    except CLIPerError:
        raise
    except Exception as error:
        raise MemoryUnavailableError(f"Could not read preferences of user {user_id!r}: {error}") from error


@dataclass
class GenerationRequest:
    """One prompt and how to answer it. ``weights`` override the user's stored preferences.

    ``response_prefix`` is written at the start of the assistant's turn (not part of the result's
    text); ``raw_prompt`` sends a string prompt as is, without the chat template; ``memory`` replaces
    the engine's own memory for this request; ``answer_after_tool_result`` withholds the tools when the
    last message is a tool result, so the model answers in words (small models otherwise call again).
    """

    prompt: str | Sequence[Message]
    weights: Mapping[str, float] | None = None
    user_id: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    guidance: bool = True
    preference_prompt: bool = False
    tools: Sequence[Mapping[str, Any]] | None = None
    unguided_spans: Sequence[tuple[str, str]] = ()
    response_prefix: str = ""
    raw_prompt: bool = False
    memory: WeightsSource | None = None
    answer_after_tool_result: bool = False
    cancelled: threading.Event | None = None
    """Set from any thread to stop the row at its next token (its result then ends there, ``finish_reason``
    "cancelled"); ``agenerate`` sets it when its task is cancelled, so a client that gives up frees the cores."""
    timeout: float | None = None
    """Seconds the call may take from when the engine gets it, waiting for its batch included; past them the row
    stops at its next token and the call fails with ``GenerationTimeoutError`` (the text so far kept in the result).
    The refusal look-ahead's drafts are not watched, so a call may overrun by theirs."""

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if s)

    def spans(self) -> tuple[tuple[str, str], ...]:
        """Spans written without guidance: the caller's, plus tool calls whenever tools are offered."""
        return (*self.unguided_spans, TOOL_CALL_SPAN) if self.tools else tuple(self.unguided_spans)


@dataclass
class GenerationResult:
    """The answer to one request, with what was used to produce it."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: Literal["stop", "length", "cancelled", "error"] = "stop"
    weights: dict[str, float] = field(default_factory=dict)
    weights_source: str = "none"
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    error: CLIPerError | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def raise_for_error(self) -> GenerationResult:
        """This result, or its request's error raised."""
        if self.error is not None:
            raise self.error
        return self


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as one batch padded on the left, as decoder-only generation reads them, with its
    attention mask."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for index, ids in enumerate(sequences):
        input_ids[index, width - len(ids) :] = torch.tensor(ids)
        attention_mask[index, width - len(ids) :] = 1
    return input_ids, attention_mask


@dataclass
class _PreparedRow:
    request: GenerationRequest
    result: GenerationResult
    prompt_ids: list[int]
    opening: list[int] = field(default_factory=list)
    """Answer tokens fixed before decoding (the last of ``prompt_ids``): the base model's opening, given
    to a guided row whose guided opening declined (``_OpeningCheck``)."""
    unrequested: tuple[list[dict[str, Any]], Sequence[Mapping[str, Any]] | None] | None = None
    """The messages and tools without the preference request, for a guided row asked with
    ``preference_prompt``; rendered only if the request makes the base model decline (rare)."""
    unrequested_opening: list[int] | None = None
    """The base model's opening to the ``unrequested`` prompt, set where the request made it decline and the plain
    question does not: the row is answered, still prompted and guided, from this opening."""
    disclaimer_opening: list[int] | None = None
    """The base model's first ``disclaimer_lookahead`` tokens, set where it opens with a disclaimer and then
    answers: the row is answered, guided, from them, so guidance takes over once the model has turned to the
    answer (from the 6-token opening, a push towards short answers ends it after the disclaimer: a refusal)."""
    drafted_answer: list[int] | None = None
    """The base model's whole greedy answer, end token included, where it opens with a disclaimer and ends within
    ``disclaimer_lookahead`` tokens (a refusal) and the row is greedy: its unguided answer is that draft, as is."""

    @property
    def start(self) -> list[int] | None:
        """The opening this row is answered from, settled before decoding (it skips the group's first pass)."""
        settled = (self.unrequested_opening, self.disclaimer_opening, self.drafted_answer)
        return next((opening for opening in settled if opening is not None), None)

    @property
    def guided(self) -> bool:
        """Whether any class weighs on this row (a row with only zero weights decodes unguided)."""
        return any(self.result.weights.values())

    @property
    def weighted_classes(self) -> list[str]:
        """The classes that weigh on this row (non-zero weight)."""
        return [name for name, value in self.result.weights.items() if value]


class _RowStopCriteria(StoppingCriteria):
    """Per-row ``max_new_tokens``, stop strings of any token length and cancellation (``GenerationRequest.cancelled``);
    remembers where each row stopped, and which rows were cancelled."""

    def __init__(self, tokenizer, prompt_length: int, rows: list[_PreparedRow]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.max_new = [row.request.max_new_tokens - len(row.opening) for row in rows]
        self.stops = [row.request.stop_strings() for row in rows]
        self.cancel_events = [row.request.cancelled for row in rows]
        # A token holds at least one character, so this many trailing tokens cover any stop string.
        self.windows = [max((len(s) for s in stops), default=0) + 2 for stops in self.stops]
        self.stopped_at: list[int | None] = [None] * len(rows)
        self.cancelled: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, stops in enumerate(self.stops):
            if self.stopped_at[row] is not None:
                done[row] = True
                continue
            hit = generated >= self.max_new[row]
            if not hit and (event := self.cancel_events[row]) is not None and event.is_set():
                hit = True
                self.cancelled.add(row)
            if stops and not hit:
                tail = self.tokenizer.decode(input_ids[row, -min(self.windows[row], generated) :])
                hit = any(stop in tail for stop in stops)
            if hit:
                self.stopped_at[row] = generated
                done[row] = True
        return done


class _OpeningCheck(StoppingCriteria):
    """Stops a guided row whose first ``length`` tokens ``declines`` where the base model's opening did not.

    Guidance must not turn an answer into a refusal: at an opening, a warm or blunt "I" or "As" can pass
    the plausibility floor, and the base model then writes "I'm sorry, I can't …" on its own (and
    ``is_refusal`` also counts an answer a strong push ended at once, saying nothing). A stopped row is
    answered again from the base model's opening (``CLIPerEngine._from_openings``)."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        declines: Callable[[str], bool],
        prompt_length: int,
        length: int,
        rows: list[int],
    ) -> None:
        self.decode = decode
        self.declines = declines
        self.prompt_length = prompt_length
        self.length = length
        self.unchecked = set(rows)
        self.declined: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] - self.prompt_length >= self.length:
            self.check(input_ids[:, self.prompt_length :])
        done[list(self.declined)] = True
        return done

    def check(self, generated: torch.Tensor) -> None:
        """Judge the unchecked rows' openings (once each; after ``generate``, rows of a batch that ended
        before ``length`` tokens)."""
        for row in sorted(self.unchecked):
            if self.declines(self.decode(generated[row, : self.length].tolist())):
                self.declined.add(row)
        self.unchecked.clear()


class _SpanGate:
    """Per step, the rows that are inside an open unguided span (e.g. ``<tool_call>`` … ``</tool_call>``)."""

    def __init__(self, tokenizer, prompt_length: int, rows: list[_PreparedRow]) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.spans = [row.request.spans() for row in rows]
        self.prefixes = [row.request.response_prefix for row in rows]
        self.openings = [row.opening for row in rows]

    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        inside = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for row, spans in enumerate(self.spans):
            if spans:
                answer = self.openings[row] + input_ids[row, self.prompt_length :].tolist()
                text = self.prefixes[row] + self.tokenizer.decode(answer)
                opening = text.lstrip()
                # inside an open span, or still possibly writing a span's opening marker
                inside[row] = any(
                    text.rfind(start) > text.rfind(end) or start.startswith(opening) for start, end in spans
                )
        return inside


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text``, or -1."""
    return min((text.find(stop) for stop in stops if stop in text), default=-1)


def as_request(prompt: str | Sequence[Message] | GenerationRequest, options: dict[str, Any]) -> GenerationRequest:
    return prompt if isinstance(prompt, GenerationRequest) else GenerationRequest(prompt, **options)


STREAM_THREAD = "cliper-stream"
"""The name of the thread each ``TextStream`` decodes on."""

RESTART = object()
"""Queued by ``_TokenQueueStreamer.restart``: the tokens received so far are no longer the answer."""


class _StreamClosed(Exception):
    """Raised on the decoding thread when the stream's reader has gone, so that decoding stops at the next token."""


class _TokenQueueStreamer(BaseStreamer):
    """Receives generated token ids (batch of one) and hands them to the consuming thread; ``on_put``, if given,
    is called after each item is queued (it wakes an async consumer, which waits on an event, not a thread).

    Once ``close`` is called (the reader stopped early: a ``break``, a closed generator, a cancelled task), the next
    item raises ``_StreamClosed`` on the decoding thread instead: an abandoned answer decoded to its end would slow
    every other request for as long as it ran (docs/performance.md, "A stream its reader left")."""

    def __init__(self, on_put: Callable[[], None] | None = None) -> None:
        self.queue: queue.Queue[list[int] | object | None] = queue.Queue()
        self.prompt_seen = False
        self.on_put = on_put
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()

    def _queue(self, item: list[int] | object | None) -> None:
        if self.closed.is_set() and item is not None:
            raise _StreamClosed
        self.queue.put(item)
        if self.on_put is not None:
            self.on_put()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first sends the prompt
            self.prompt_seen = True
            return
        self._queue(value.reshape(-1).tolist())

    def show(self, tokens: list[int]) -> None:
        """Tokens the next ``generate`` goes on from (its prompt ends with them), shown at once."""
        self._queue(list(tokens))

    def restart(self, opening: list[int]) -> None:
        """The answer so far is dropped and starts again from ``opening``; the next ``generate`` sends its
        prompt first, like the last one."""
        self._queue(RESTART)
        self._queue(opening)
        self.prompt_seen = False

    def end(self) -> None:
        """Called by ``generate`` at its end; an answer may go on in another call (``restart``)."""

    def finish(self) -> None:
        """The engine is done with the row: ends the consumer's iteration."""
        self._queue(None)


class _ReaderWatch(BaseStreamer):
    """Stands in for a stream's streamer during a draft its reader is not shown (a sampled row's draft past a
    disclaimer is not its answer): shows nothing, but stops the draft, as the streamer would, once the reader has
    gone."""

    def __init__(self, streamer: _TokenQueueStreamer) -> None:
        self.closed = streamer.closed

    def put(self, value: object) -> None:
        if self.closed.is_set():
            raise _StreamClosed

    show = put

    def end(self) -> None:
        """Called by ``generate`` at its end."""


class _Deltas:
    """Turns the token chunks of one streamed row into text deltas. It holds back what may still become a stop
    string, half of a multi-byte character, and a guided row's opening until the refusal look-ahead has passed it
    (a guided opening is only shown once it is known not to be a refusal guidance wrote: ``_OpeningCheck``)."""

    def __init__(self, engine: CLIPerEngine, row: _PreparedRow) -> None:
        self.engine = engine
        self.max_new_tokens = row.request.max_new_tokens
        self.stops = row.request.stop_strings()
        self.holdback = max((len(stop) for stop in self.stops), default=1) - 1
        self.opening = (engine.refusal_lookahead or 0) if row.guided else 0
        self.eos = set(engine.eos_token_ids)
        self.tokens: list[int] = []
        self.emitted = ""

    def feed(self, chunk: list[int] | object) -> str:
        """The text this chunk adds that is safe to show now ("" if none)."""
        if chunk is RESTART:
            self.tokens = []
            return ""
        assert isinstance(chunk, list)
        self.tokens.extend(token for token in chunk if token not in self.eos)
        del self.tokens[self.max_new_tokens :]  # a draft shown as it is made may run past the answer's end
        if len(self.tokens) <= self.opening:
            return ""
        text = self.engine.decode(self.tokens)
        cut = first_stop(text, self.stops)
        safe = text[:cut] if cut >= 0 else text[: max(len(text) - self.holdback, 0)]
        if safe.endswith("\ufffd") or len(safe) <= len(self.emitted):  # half of a multi-byte character
            return ""
        delta, self.emitted = safe[len(self.emitted) :], safe
        return delta

    def rest(self, result: GenerationResult) -> str:
        """What the finished answer holds beyond what was shown."""
        return result.text[len(self.emitted) :] if result.text.startswith(self.emitted) else ""


class TextStream:
    """Iterates text deltas as they are produced, from sync code (``for``) or async code (``async for``, which
    waits on the event loop, holding no thread); ``result`` is set once iteration has finished.

    The concatenated deltas always equal ``result.text``, stop strings and end tokens included. The answer is
    prepared and decoded on a thread of its own; a bad request raises its error at the first step. A reader that
    stops early (``break``, closing the iterator, cancelling the task that reads it) stops the decoding at its next
    token; ``result`` then stays None.
    """

    def __init__(self, engine: CLIPerEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self.result: GenerationResult | None = None

    def _start(self, on_put: Callable[[], None] | None = None) -> tuple[_TokenQueueStreamer, dict[str, Any]]:
        """Start answering on a thread of its own; the returned state gets ``row`` before any chunk is queued,
        and ``error`` if answering raised."""
        streamer = _TokenQueueStreamer(on_put)
        state: dict[str, Any] = {}

        def run() -> None:
            try:
                row = state["row"] = self._engine._prepare(self._request)
                if row.result.error is None:
                    self._engine._run_group([row], streamer=streamer)
            except BaseException as error:  # re-raised in the consumer
                state["error"] = error
            finally:
                streamer.finish()

        threading.Thread(target=run, name=STREAM_THREAD, daemon=True).start()
        return streamer, state

    def _finish(self, state: dict[str, Any], deltas: _Deltas | None) -> str:
        """Raise what answering raised, or set ``result`` and return the text not yet shown."""
        if "error" in state:
            raise state["error"]
        row = state["row"]
        self.result = row.result
        if row.result.error is not None:
            raise row.result.error
        return (deltas or _Deltas(self._engine, row)).rest(row.result)

    def __iter__(self) -> Iterator[str]:
        streamer, state = self._start()
        deltas = None
        try:
            while (chunk := streamer.queue.get()) is not None:
                deltas = deltas or _Deltas(self._engine, state["row"])
                if delta := deltas.feed(chunk):
                    yield delta
        finally:  # also when the reader stops early: decoding stops at its next token
            streamer.close()
        if rest := self._finish(state, deltas):
            yield rest

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queued = asyncio.Event()

        def wake() -> None:
            with suppress(RuntimeError):  # the loop has closed: no one is waiting any more
                loop.call_soon_threadsafe(queued.set)

        streamer, state = self._start(on_put=wake)
        deltas = None
        try:
            while True:
                queued.clear()
                try:
                    chunk = streamer.queue.get_nowait()
                except queue.Empty:
                    await queued.wait()
                    continue
                if chunk is None:
                    break
                deltas = deltas or _Deltas(self._engine, state["row"])
                if delta := deltas.feed(chunk):
                    yield delta
        finally:  # also when the task is cancelled (a client gone) or the generator closed
            streamer.close()
        if rest := self._finish(state, deltas):
            yield rest


class CLIPerEngine:
    """Loads a base model and its preference classifier once and generates guided answers.

    Args:
        model: ``"embedded"`` (default), a Hugging Face id, a local folder, a ``.gguf`` file, or a
            ``LoadedModel``.
        classifier: ``"default"`` (the packaged classifier for the model, if any), a folder saved by
            ``PreferenceClassifier.save``, a ``PreferenceClassifier``, or None (or ``"none"``) for no
            guidance.
        memory: where per-user weights come from when a request names a user and no weights.
        top_k: candidates the classifier scores per step (None: the whole vocabulary).
        overflow: prompts longer than the context window are ``"truncate"``-d from the left (with a
            warning in the result) or ``"refuse"``-d with ``PromptTooLongError``.
        max_batch_size: rows per ``generate`` call.
        batch_window: seconds a ``generate`` call waits for calls from other threads, which are then answered in
            one batch (``RequestBatcher``); None answers each call alone, at once.
        guided_no_repeat_ngram: on guided rows only, never repeat an n-gram of the generated text (a loop
            guard: a strong push can lock greedy decoding into a loop); None turns it off.
        guided_plausibility: on guided rows only, leave out tokens whose base probability is below this
            fraction of that of the most likely token the loop guard allows (end-of-turn tokens exempt),
            so that guidance reorders only what the base model finds plausible; None turns it off. The
            classifier may name a stricter floor for some classes, in both settings or in one
            (``ClassifierConfig.setting_floors``), which rows weighing those classes decode under instead.
        refusal_lookahead: before guiding, draft each guided row's first tokens greedily without guidance
            (this many); a row whose draft ``declines`` is answered without guidance, so whether to refuse
            stays the base model's decision and guidance cannot talk it out of a refusal. Nor into one: a
            guided answer whose first this-many tokens decline, where the draft did not, is answered again
            (guided) from the draft's opening; streams hold these tokens back until that is decided. None
            turns both off.
        declines: what counts as a refusal in an opening (default: the English openings of ``is_refusal``).
        disclaims: which of those openings may be a disclaimer the base model answers after ("As an AI …";
            default ``is_disclaimer``).
        disclaimer_lookahead: such an opening is drafted on to this many tokens; if the base model is still
            writing there, it hedges and then answers, so the row is guided from those tokens on rather than
            left unguided. None drafts no further: every opening that declines is a refusal.
        dtype: what a model named by its spec is loaded in (``ModelDType``; None: float32, or as a
            ``LoadedModel`` is); the classifier's head keeps float32 and reads hidden states in float32.
    """

    def __init__(
        self,
        model: str | LoadedModel = EMBEDDED_SPEC,
        classifier: str | Path | PreferenceClassifier | None = DEFAULT_CLASSIFIER,
        memory: WeightsSource | None = None,
        top_k: int | None = 32,
        overflow: Literal["truncate", "refuse"] = "truncate",
        max_batch_size: int = 16,
        batch_window: float | None = DEFAULT_BATCH_WINDOW,
        guided_no_repeat_ngram: int | None = 4,
        guided_plausibility: float | None = 0.1,
        refusal_lookahead: int | None = DEFAULT_REFUSAL_LOOKAHEAD,
        declines: Callable[[str], bool] = is_refusal,
        disclaims: Callable[[str], bool] = is_disclaimer,
        disclaimer_lookahead: int | None = DEFAULT_DISCLAIMER_LOOKAHEAD,
        dtype: ModelDType | None = None,
    ) -> None:
        if not isinstance(model, LoadedModel):
            model = load_model(model, dtype or "float32")
        elif dtype is not None and model.dtype != dtype:
            raise InvalidRequestError(f"dtype={dtype!r}, but the model given is loaded in {model.dtype}")
        self.loaded = model
        self.classifier = self._resolve_classifier(classifier)
        self.memory = memory
        self.top_k = top_k
        self.overflow = overflow
        self.max_batch_size = max_batch_size
        if batch_window is not None and not batch_window >= 0:
            raise InvalidRequestError(f"batch_window must be None or >= 0 seconds, got {batch_window}")
        self.batcher = (
            RequestBatcher(self.generate_batch, batch_window, max_batch_size) if batch_window is not None else None
        )
        self.guided_no_repeat_ngram = guided_no_repeat_ngram
        self.guided_plausibility = guided_plausibility
        self.refusal_lookahead = refusal_lookahead
        self.declines = declines
        self.disclaims = disclaims
        self.disclaimer_lookahead = disclaimer_lookahead
        tokenizer = self.loaded.tokenizer
        eos = self.loaded.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id]
        self.eos_token_ids: list[int] = [int(token) for token in eos if token is not None]
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    def __copy__(self) -> CLIPerEngine:
        """A copy shares the model and classifier, not the batcher: its calls run with the copy's settings."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        if self.batcher is not None:
            clone.batcher = RequestBatcher(clone.generate_batch, self.batcher.window, self.batcher.max_rows)
        return clone

    # --- set-up ------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def model(self):
        return self.loaded.model

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes a request may weight: the classifier's, less its background classes."""
        if self.classifier is None:
            return DEFAULT_CLASSES
        return tuple(name for name in self.classifier.classes if name not in BACKGROUND_CLASSES)

    def _resolve_classifier(self, spec: str | Path | PreferenceClassifier | None) -> PreferenceClassifier | None:
        if spec is None or isinstance(spec, PreferenceClassifier):
            return spec
        if str(spec).lower() == "none":
            return None
        if str(spec) == DEFAULT_CLASSIFIER:
            folder = default_classifier_path(self.loaded)
            return PreferenceClassifier.load(folder, self.loaded) if folder else None
        return PreferenceClassifier.load(spec, self.loaded)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # --- public API --------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[Message] | GenerationRequest, **options: Any) -> GenerationResult:
        """Answer one prompt; raises the request's error if it was refused. Calls from other threads that arrive
        within ``batch_window`` of each other are answered in one batch."""
        request = with_deadline(as_request(prompt, options))
        result = self.batcher.answer(request) if self.batcher else self.generate_batch([request])[0]
        return result.raise_for_error()

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Answer many requests in batches of ``max_batch_size``, each with its own weights and sampling settings.

        A bad request gets a result with ``error`` set; the other rows are answered as usual. A sampled request
        with a seed draws the same sample whatever else is in its batch (``RowSamplingLogitsProcessor``).
        """
        rows = [self._prepare(with_deadline(request)) for request in requests]
        valid = [row for row in rows if row.result.error is None]
        for start in range(0, len(valid), self.max_batch_size):
            self._run_group(valid[start : start + self.max_batch_size])
        return [row.result for row in rows]

    def stream(self, prompt: str | Sequence[Message] | GenerationRequest, **options: Any) -> TextStream:
        """Stream one answer as text deltas; see ``TextStream``."""
        request = with_deadline(as_request(prompt, options))
        return TextStream(self, request)

    async def agenerate(self, prompt: str | Sequence[Message] | GenerationRequest, **options: Any) -> GenerationResult:
        """``generate`` without blocking the event loop. With the batcher, waiting holds no thread, so every
        concurrent call can join one batch (not only as many as the loop's default executor has threads).
        Cancelling the task (a client gone, ``asyncio.wait_for``'s timeout) stops its row at the next token."""
        request = as_request(prompt, options)
        if self.batcher is None:
            return (await self.agenerate_batch([request]))[0].raise_for_error()
        request = _cancellable(request)
        return (await _stopping_on_cancel([request], self.batcher.aanswer(request))).raise_for_error()

    async def agenerate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """``generate_batch`` on a thread of its own, without blocking the event loop; cancelling the task stops
        every row at its next token."""
        requests = [_cancellable(request) for request in requests]
        return await _stopping_on_cancel(requests, asyncio.to_thread(self.generate_batch, requests))

    async def astream(self, prompt: str | Sequence[Message] | GenerationRequest, **options: Any) -> AsyncIterator[str]:
        """``stream`` for async code: the deltas are awaited on the event loop, holding no thread."""
        async for delta in self.stream(prompt, **options):
            yield delta

    def resolve_weights(
        self, weights: Mapping[str, float] | None, user_id: str | None, memory: WeightsSource | None = None
    ) -> tuple[dict[str, float], str]:
        """The weights a request runs with and where they came from: explicit, memory, or none."""
        memory = memory or self.memory
        if weights is not None:
            return validate_weights(weights, self.classes), "explicit"
        if user_id is not None and memory is not None:
            if stored := stored_weights(memory, user_id):
                return validate_weights(stored, self.classes), "memory"
            return {}, "none: no stored preferences for this user"
        return {}, "none"

    def scaled_for_setting(self, weights: Mapping[str, float], prompted: bool) -> dict[str, float]:
        """``weights`` times the classifier's factors for the setting (classes not named keep theirs):
        ``prompted_weight_factors`` with the request also in the prompt, which already moves the answer part
        of the way, else ``unprompted_weight_factors``. A factor above 1 raises a weight up to
        ``MEASURED_WEIGHT_CAP`` at most, the strongest α whose fluency was measured, so a profile with a
        raised ``scale`` cannot reach an α nobody measured (a weight already above it is kept). The engine
        scales weights from memory so; explicit weights are what the caller asked for and stay as given."""
        config = self.classifier.config if self.classifier is not None else None
        factors = (config.prompted_weight_factors if prompted else config.unprompted_weight_factors) if config else {}
        return {
            name: min(value * factors.get(name, 1.0), max(value, MEASURED_WEIGHT_CAP))
            for name, value in weights.items()
        }

    def token_ids(self, text: str) -> list[int]:
        """``text`` in the model's own tokens, as it appears inside a prompt (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_tokens(self, prompt: str | Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """How many tokens the model reads for ``prompt`` (with ``tools``, as OpenAI-style schemas): rendered by its
        chat template as ``generate`` renders it, before any preference request the engine may add and before
        truncation (what a framework counts to fit a conversation into ``context_window``)."""
        if not (messages := message_dicts(prompt)):
            return 0
        if tools:
            check_tools_supported(self.tokenizer)
        return len(self.token_ids(self._render(messages, tools, "")))

    def measure_style(self, response: str, prompt: str | Sequence[Message] | None = None) -> dict[str, float]:
        """How strongly a response shows each class, by the classifier: per axis, the two poles'
        probabilities from the mean token-level log-probability (they sum to 1 on each axis)."""
        if self.classifier is None:
            raise NoClassifierError(f"No preference classifier for {self.loaded.name} to measure style with")
        prefix = render_chat(self.tokenizer, as_messages(prompt)) if prompt else ""
        prompt_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise EmptyPromptError("The response to measure is empty")
        ids = torch.tensor([(prompt_ids or [self.pad_token_id]) + response_ids])
        with torch.inference_mode():
            answer_start = ids.shape[1] - len(response_ids)
            log_probs = self.classifier.sequence_log_probs(ids, torch.ones_like(ids), answer_start=answer_start)
        mean = log_probs[0, -len(response_ids) :].mean(0)
        classes = self.classifier.classes
        style: dict[str, float] = {}
        for first, second in AXES.values():
            if first in classes and second in classes:
                pair = torch.softmax(mean[[classes.index(first), classes.index(second)]], -1)
                style[first], style[second] = float(pair[0]), float(pair[1])
        for name in self.classes:
            style.setdefault(name, float(mean[classes.index(name)].exp()))
        return style

    # --- internals ---------------------------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> _PreparedRow:
        result = GenerationResult()
        row = _PreparedRow(request, result, [])
        try:
            if request.max_new_tokens < 1:
                raise InvalidRequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
            if not (request.temperature >= 0 and math.isfinite(request.temperature)):
                raise InvalidRequestError(f"temperature must be finite and >= 0, got {request.temperature}")
            if not 0 < request.top_p <= 1:
                raise InvalidRequestError(f"top_p must be in (0, 1], got {request.top_p}")
            if request.timeout is not None and not _valid_timeout(request.timeout):
                raise InvalidRequestError(f"timeout must be a finite number of seconds > 0, got {request.timeout}")
            weights, source = self.resolve_weights(request.weights, request.user_id, request.memory)
            plain = as_messages(request.prompt)
            messages = with_preference_request(plain, weights) if request.preference_prompt else plain
            prompted = request.preference_prompt
            if source == "memory" and (scaled := self.scaled_for_setting(weights, prompted)) != weights:
                factors = "prompted_weight_factors" if prompted else "unprompted_weight_factors"
                weights, source = scaled, f"memory, scaled by the classifier's {factors}"
            if not request.guidance:
                weights, source = {}, "none: guidance off for this call"
            if any(weights.values()) and self.classifier is None:
                raise NoClassifierError(
                    f"Guidance weights were given, but there is no preference classifier for "
                    f"{self.loaded.name}. Train one with `cliper data generate` and `cliper train`, "
                    "then pass it with --classifier PATH (or classifier=PATH)."
                )
            result.weights, result.weights_source = weights, source
            tools = request.tools
            if tools and request.answer_after_tool_result and messages[-1].get("role") == "tool":
                tools, messages, plain = None, tool_results_as_question(messages), tool_results_as_question(plain)
            if tools:
                check_tools_supported(self.tokenizer)
            if request.raw_prompt and isinstance(request.prompt, str):
                row.prompt_ids = self._fit_context(self.token_ids(request.prompt), row)
            else:
                text = self._render(messages, tools, request.response_prefix)
                row.prompt_ids = self._fit_context(self.token_ids(text), row)
                if row.guided and messages != plain:
                    row.unrequested = plain, tools
        except CLIPerError as error:
            result.error, result.finish_reason = error, "error"
        return row

    def _render(self, messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None, prefix: str) -> str:
        return render_chat(self.tokenizer, messages, tools) + prefix

    def _fit_context(self, ids: list[int], row: _PreparedRow) -> list[int]:
        limit = self.loaded.context_window - row.request.max_new_tokens
        if len(ids) <= limit:
            return ids
        if self.overflow == "refuse" or limit < 1:
            raise PromptTooLongError(
                f"The prompt has {len(ids)} tokens; with max_new_tokens={row.request.max_new_tokens} "
                f"only {max(limit, 0)} fit the context window of {self.loaded.context_window}"
            )
        message = f"Prompt truncated from the left: {len(ids)} tokens, kept the last {limit}"
        warnings.warn(message, stacklevel=4)
        row.result.warnings.append(message)
        return ids[-limit:]

    def _run_group(self, rows: list[_PreparedRow], streamer: _TokenQueueStreamer | None = None) -> None:
        """One ``generate`` call for the rows (up to ``max_batch_size``), those whose opening the look-ahead settled
        (``_PreparedRow.start``) included, each from that opening; and one more for the guided rows whose opening
        declined during it, from the base model's opening."""
        started = time.perf_counter()
        input_ids, attention_mask = left_padded([row.prompt_ids for row in rows], self.pad_token_id)
        prompt_cache, openings = self._leave_refusals_unguided(rows, input_ids, attention_mask, streamer)
        settled = [row for row in rows if row.start is not None]
        if settled:
            kept = [index for index, row in enumerate(rows) if row.start is None]
            rows, input_ids, attention_mask = [rows[i] for i in kept], input_ids[kept], attention_mask[kept]
            openings = [openings[i] for i in kept] if openings is not None else None
            if prompt_cache is not None and kept:
                prompt_cache.batch_select_indices(torch.tensor(kept))
            for row in settled:  # what it was asked; what the drafts that settled it cost is the decoding's too
                row.result.prompt_tokens = len(row.prompt_ids)
            restarted = self._from_openings(settled, [row.start for row in settled], streamer, started)
            rows, input_ids, attention_mask, prompt_cache = self._joined(
                rows, input_ids, attention_mask, prompt_cache, restarted
            )
            openings = [*openings, *([] for _ in restarted)] if openings is not None else None
        declined = self._decode(rows, input_ids, attention_mask, prompt_cache, openings, streamer, started)
        if again := self._from_openings([row for row, _ in declined], [opening for _, opening in declined], streamer):
            self._run_group(again, streamer)

    def _joined(
        self,
        rows: list[_PreparedRow],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Cache | None,
        restarted: list[_PreparedRow],
    ) -> tuple[list[_PreparedRow], torch.Tensor, torch.Tensor, Cache | None]:
        """The group's rows and the ``restarted`` ones (each with its opening at the end of its prompt) as one batch,
        so a row whose opening was settled costs no ``generate`` pass of its own; on this CPU a pass costs about as
        much for one row as for eight. The cache holds every row's prompt less its last token: the group's,
        padded on the left to the joined width, and the restarted rows', read by a one-token draft. Where the
        cache cannot be joined so, the prompts are read again."""
        if not restarted:
            return rows, input_ids, attention_mask, cache
        joined = rows + restarted
        ids, mask = left_padded([row.prompt_ids for row in joined], self.pad_token_id)
        if cache is None or not rows:
            return joined, ids, mask, None
        theirs = self._prompt_cache(self._draft(ids[len(rows) :], mask[len(rows) :], 1).cache, ids.shape[1])
        if theirs is None:
            return joined, ids, mask, None
        width = ids.shape[1] - 1
        for ours, their in zip(cache.layers, theirs.layers, strict=True):
            pad = (0, 0, width - ours.keys.shape[-2], 0)  # on the left of the sequence axis: masked out
            ours.keys = torch.cat([torch.nn.functional.pad(ours.keys, pad), their.keys])
            ours.values = torch.cat([torch.nn.functional.pad(ours.values, pad), their.values])
        return joined, ids, mask, cache

    def _decode(
        self,
        rows: list[_PreparedRow],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_cache: Cache | None,
        openings: list[list[int]] | None,
        streamer: _TokenQueueStreamer | None,
        started: float,
    ) -> list[tuple[_PreparedRow, list[int]]]:
        """Decode the rows in one ``generate`` call and finish them; return the guided rows whose opening
        declined where the base model's (in ``openings``, from the look-ahead) did not, each with that opening."""
        if not rows:  # every row of the group starts from a settled opening
            return []
        width = input_ids.shape[1]
        stop_criteria = _RowStopCriteria(self.tokenizer, width, rows)
        processors = []
        opening_check = None
        if openings is not None:
            checked = [i for i, row in enumerate(rows) if row.guided and not row.opening]
            opening_check = _OpeningCheck(self.decode, self.declines, width, self.refusal_lookahead, checked)
        weights = self._weight_matrices(rows)
        if weights is not None:
            assert self.classifier is not None
            processors.append(
                ClassifierGuidedLogitsProcessor(
                    self.classifier,
                    weights[0],
                    attention_mask,
                    top_k=self.top_k,
                    always_include=self.eos_token_ids,
                    suspend=_SpanGate(self.tokenizer, width, rows) if any(r.request.spans() for r in rows) else None,
                    no_repeat_ngram=self.guided_no_repeat_ngram,
                    plausibility=[self._plausibility_floor(row) for row in rows],
                    favourite_ngrams=self._favourite_ngrams(rows),
                    ending_weights=weights[1],
                )
            )
        requests = [row.request for row in rows]
        if any(request.temperature > 0 for request in requests):
            processors.append(
                RowSamplingLogitsProcessor(
                    [request.temperature for request in requests],
                    [request.top_p for request in requests],
                    [request.seed for request in requests],
                )
            )
        tap = (
            self.classifier.tap(self.model)
            if weights is not None and self.classifier.kind == "shared"
            else nullcontext()
        )
        with tap, torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(row.request.max_new_tokens - len(row.opening) for row in rows),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([stop_criteria, *filter(None, [opening_check])]),
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids,
                streamer=streamer,
                cache=prompt_cache,
                do_sample=False,  # a sampled row's token is drawn by RowSamplingLogitsProcessor
            )
        seconds = time.perf_counter() - started
        for index, row in enumerate(rows):
            stopped_at = stop_criteria.stopped_at[index]
            self._finish(row, output[index, width:].tolist(), stopped_at, seconds, index in stop_criteria.cancelled)
            row.result.prompt_tokens = len(row.prompt_ids) - len(row.opening)
        if opening_check is None or openings is None:
            return []
        opening_check.check(output[:, width:])
        return [(rows[i], openings[i]) for i in sorted(opening_check.declined)]

    def _from_openings(
        self,
        rows: list[_PreparedRow],
        openings: list[list[int]],
        streamer: _TokenQueueStreamer | None,
        started: float | None = None,
    ) -> list[_PreparedRow]:
        """The rows to answer, still guided, each from an opening given before decoding: the base model's own
        (greedy) opening, for a row whose guided opening declined where the base model's did not (the refusal
        was guidance's doing, not the model's); for a row whose preference request made the base model decline,
        its opening to the plain question (``unrequested_opening``), the request kept in the prompt; for one whose
        base model opens with a disclaimer and then answers, its longer draft (``disclaimer_opening``). A row whose
        opening is a whole answer (it ends, as ``drafted_answer`` does, or holds a stop string), or all the answer
        may hold, is finished from it here, with the seconds since ``started`` (its drafts' cost)."""
        restarted = []
        for row, opening in zip(rows, openings, strict=True):
            if row.unrequested_opening is not None:
                row.result.warnings.append(
                    "The preference request in the prompt made the base model decline where it answers the "
                    "question without it; answered, guided and still asked, from its opening to the plain question"
                )
            elif row.disclaimer_opening is not None:
                message = f"{DISCLAIMER_WARNING}; answered, guided, from its first {len(opening)} tokens"
                row.result.warnings.append(message)
            elif row.drafted_answer is None:  # a drafted answer is the base model's refusal (``weights_source``)
                row.result.warnings.append(
                    "Guidance opened this answer with a refusal (or ended it at once) where the base model does "
                    "not; answered again, guided, from the base model's opening"
                )
            opening = opening[: row.request.max_new_tokens]
            again = _PreparedRow(row.request, row.result, row.prompt_ids + opening, opening)
            if streamer is not None:
                streamer.restart(opening)
            whole = self._ends(opening) or first_stop(self.decode(opening), row.request.stop_strings()) >= 0
            if len(opening) < row.request.max_new_tokens and not whole:
                restarted.append(again)
            else:
                self._finish(again, [], None, time.perf_counter() - started if started is not None else 0.0)
        return restarted

    def _leave_refusals_unguided(
        self,
        rows: list[_PreparedRow],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        streamer: _TokenQueueStreamer | None = None,
    ) -> tuple[Cache | None, list[list[int]] | None]:
        """Switch guidance off for guided rows whose unguided, greedy opening is a refusal; return the
        prompts' cache and every row's opening (up to its first end token), or Nones without a draft.

        Guidance steers towards a style, and a refusal is rarely in any style's favour: left alone, it
        turns the base model's refusals into answers, harmful requests included (measured in
        ``docs/classifier.md``). The draft reads the prompts once for the whole group; its cache, cut
        back to the prompts less their last token, is returned for the answer to start from, so the
        look-ahead costs ``refusal_lookahead`` greedy steps, not a second reading of long prompts.
        Rows that already start from a fixed opening are past this decision.

        A greedy row's answer starts with the base model's draft past a disclaimer however it is judged (guided
        from it, or, ended early, the unguided answer itself), so a greedy stream shows that draft as it is made,
        unless a preference request in its prompt may still send it to the plain question's opening.
        """
        guided = [index for index, row in enumerate(rows) if row.guided and not row.opening]
        if not self.refusal_lookahead or self.classifier is None or not guided:
            return None, None
        draft = self._draft(input_ids, attention_mask)
        openings = [self._until_end(tokens) for tokens in draft.sequences[:, input_ids.shape[1] :].tolist()]
        shown = len(rows) == 1 and rows[0].request.temperature == 0 and rows[0].unrequested is None
        watched = streamer if shown or streamer is None else _ReaderWatch(streamer)
        judged = self._judge_openings(draft, attention_mask, guided, watched)
        declined = []  # with the base model's draft: its whole answer where it has ended
        for index, (kind, opening) in zip(guided, judged, strict=True):
            rows[index].disclaimer_opening = opening if kind == "disclaimer" else None
            if kind == "refusal":
                declined.append((rows[index], opening))
        self._open_without_request([row for row, _ in declined if row.unrequested is not None])
        for row, drafted in declined:
            if row.unrequested_opening is None:
                row.result.weights = {}
                row.result.weights_source = "none: the base model declines this request (refusal look-ahead)"
                row.drafted_answer = drafted if row.request.temperature == 0 and self._ends(drafted) else None
        return self._prompt_cache(draft.cache, input_ids.shape[1]), openings

    @staticmethod
    def _prompt_cache(cache: Cache | None, width: int) -> DynamicCache | None:
        """A draft's ``cache`` cut back to its prompts (``width`` tokens) less their last token, for an answer to
        start from; None where sliding-window or recurrent layers cannot be cut back (the prompt is read again)."""
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            return None
        cache.crop(width - 1 - cache.get_seq_length())
        return cache

    def _open_without_request(self, rows: list[_PreparedRow]) -> None:
        """Draft the rows' openings to the question without their preference request, and keep each that
        does not decline (``unrequested_opening``): there the request, not the question, made the base model
        decline ("curt and unfriendly" reads to it as a request to be rude), and the user asked a question the
        model answers, so declining would fail them; where the plain question declines too, the refusal is
        the base model's call and the row stays unguided."""
        if not rows:
            return
        prompts = []
        for row in rows:
            assert row.unrequested is not None
            messages, tools = row.unrequested
            limit = self.loaded.context_window - row.request.max_new_tokens  # shorter: fits where the asked one does
            prompts.append(self.token_ids(self._render(messages, tools, row.request.response_prefix))[-limit:])
        input_ids, attention_mask = left_padded(prompts, self.pad_token_id)
        draft = self._draft(input_ids, attention_mask)
        judged = self._judge_openings(draft, attention_mask, list(range(len(rows))))
        for row, (kind, opening) in zip(rows, judged, strict=True):
            if kind != "refusal":
                row.unrequested_opening = opening

    def _judge_openings(
        self,
        draft,
        attention_mask: torch.Tensor,
        rows: list[int],
        streamer: _TokenQueueStreamer | _ReaderWatch | None = None,
    ) -> list[tuple[Literal["answer", "disclaimer", "refusal"], list[int]]]:
        """Whether each of the ``rows``' drafted opening (``draft``, of the prompts under ``attention_mask``) is an
        answer, a refusal (it ``declines``), or a disclaimer the base model answers after, each with the opening to
        answer from. An opening that declines and ``disclaims`` is drafted on from the draft's own cache (the prompt
        is not read again) to ``disclaimer_lookahead`` tokens, shown on ``streamer``; only an answer still going
        there is a disclaimer (a refusal is short), whose opening is then that longer draft, and one that has ended
        is a refusal, given with its whole greedy answer, end token included."""
        width = attention_mask.shape[1]
        drafted = [self._through_end(draft.sequences[row, width:].tolist()) for row in rows]
        openings = [self._until_end(tokens) for tokens in drafted]
        texts = [self.decode(opening) for opening in openings]
        judged: list[tuple[Literal["answer", "disclaimer", "refusal"], list[int]]] = [
            ("refusal" if self.declines(text) else "answer", opening)
            for text, opening in zip(texts, openings, strict=True)
        ]
        hedged = [k for k, text in enumerate(texts) if judged[k][0] == "refusal" and self.disclaims(text)]
        if not self.disclaimer_lookahead:
            return judged
        going = [k for k in hedged if not self._ends(drafted[k])]  # every other one has ended: a whole refusal
        judged = [("refusal", drafted[k]) if k in hedged else verdict for k, verdict in enumerate(judged)]
        remaining = self.disclaimer_lookahead - (draft.sequences.shape[1] - width)
        if going and remaining > 0:
            selected = [rows[k] for k in going]
            sequences = draft.sequences[selected]
            mask = torch.cat([attention_mask[selected], torch.ones_like(sequences[:, width:])], dim=1)
            if streamer is not None:
                streamer.show(openings[going[0]])
            cache = self._cache_rows(draft.cache, selected)
            further = self._draft(sequences, mask, remaining, streamer, cache).sequences[:, sequences.shape[1] :]
            for k, tokens in zip(going, further.tolist(), strict=True):
                drafted[k] += self._through_end(tokens)
        for k in going:
            judged[k] = ("refusal" if self._ends(drafted[k]) else "disclaimer", drafted[k])
        return judged

    @staticmethod
    def _cache_rows(cache: Cache | None, rows: list[int]) -> Cache | None:
        """A copy of ``cache`` holding only ``rows``, to draft them further while the whole is kept for the answer;
        None for a cache that cannot be copied so (the rows' prompts are then read again)."""
        if not isinstance(cache, DynamicCache):
            return None
        copied = copy.deepcopy(cache)
        copied.batch_select_indices(torch.tensor(rows))
        return copied

    def _draft(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        length: int | None = None,
        streamer: _TokenQueueStreamer | _ReaderWatch | None = None,
        cache: Cache | None = None,
    ):
        """The first ``length`` (default ``refusal_lookahead``) tokens of each prompt, greedy and unguided, with
        the cache (``cache``: the prompts' own, read so far); a ``streamer`` (a batch of one) receives them as they
        are made."""
        with torch.inference_mode():
            return self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=length or self.refusal_lookahead,
                do_sample=False,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids,
                streamer=streamer,
                cache=cache,
                return_dict_in_generate=True,
            )

    def _until_end(self, tokens: list[int]) -> list[int]:
        """``tokens`` up to (not including) the first end token."""
        drafted = self._through_end(tokens)
        return drafted[:-1] if self._ends(drafted) else drafted

    def _through_end(self, tokens: list[int]) -> list[int]:
        """``tokens`` up to and including the first end token (all of them without one)."""
        end = next((i for i, token in enumerate(tokens) if token in self.eos_token_ids), len(tokens) - 1)
        return tokens[: end + 1]

    def _ends(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` end with an end token."""
        return bool(tokens) and tokens[-1] in self.eos_token_ids

    def _plausibility_floor(self, row: _PreparedRow) -> float | None:
        """The floor a guided row decodes under: the engine's, or a stricter one of the classifier's for
        the classes it weighs, in its setting (``ClassifierConfig.plausibility_floor``). Rows with different
        floors share a batch; unguided rows take the engine's, which leaves them as they are."""
        if self.classifier is None or not row.guided:
            return self.guided_plausibility
        config = self.classifier.config
        return config.plausibility_floor(row.weighted_classes, self.guided_plausibility, row.request.preference_prompt)

    def _favourite_ngrams(self, rows: list[_PreparedRow]) -> list[int | None] | None:
        """Per row, the n the loop guard holds the base model's favourite to: the rule of the classes the row
        weighs, in its setting, where they all name one (``ClassifierConfig.favourite_rule``), else the
        guard's own; None when every row takes the guard's."""
        assert self.classifier is not None
        rules = [self.classifier.config.favourite_rule(r.weighted_classes, r.request.preference_prompt) for r in rows]
        if not any(holds for holds, _ in rules):
            return None
        return [n if holds else self.guided_no_repeat_ngram for holds, n in rules]

    def _weight_matrices(self, rows: list[_PreparedRow]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """[rows, classes] guidance weights, each row's own with the other poles the classifier weighs against
        them in its setting (``ClassifierConfig.opposite_weights``), and the weights of the decision to end
        (``ClassifierConfig.ending_weights``; None where no row has any)."""
        if self.classifier is None or not any(row.guided for row in rows):
            return None
        config = self.classifier.config
        order = {name: index for index, name in enumerate(self.classifier.classes)}

        def matrix(weigh: Callable[[Mapping[str, float], bool], dict[str, float]]) -> torch.Tensor:
            filled = torch.zeros((len(rows), len(order)))
            for index, row in enumerate(rows):
                for name, value in weigh(row.result.weights, row.request.preference_prompt).items():
                    filled[index, order[name]] = value
            return filled

        ending = matrix(config.ending_weights)
        return matrix(config.opposite_weights), ending if ending.any() else None

    def _finish(
        self, row: _PreparedRow, generated: list[int], stopped_at: int | None, seconds: float, cancelled: bool = False
    ) -> None:
        """Cut the row at its end token, stop point or stop string, and fill in its result (``seconds``
        added to any spent on it before, by an answer that was started again)."""
        generated = row.opening + generated
        end = len(generated) if stopped_at is None else stopped_at + len(row.opening)
        eos_hit = next((i for i, token in enumerate(generated[:end]) if token in self.eos_token_ids), None)
        tokens = generated[: eos_hit + 1] if eos_hit is not None else generated[:end]
        text = self.decode(tokens)
        cut = first_stop(text, row.request.stop_strings())
        if cut >= 0:
            text = text[:cut]
        result = row.result
        result.text = text
        result.completion_tokens = len(tokens)
        result.finish_reason = "stop" if eos_hit is not None or cut >= 0 else "cancelled" if cancelled else "length"
        result.seconds += seconds
        if cancelled and isinstance(deadline := row.request.cancelled, Deadline) and deadline.expired:
            result.error = GenerationTimeoutError(
                f"The answer ran past its timeout of {deadline.seconds:g} s and stopped after {len(tokens)} tokens"
            )
            result.finish_reason = "error"


_SHARED: dict[tuple, CLIPerEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(
    model: str = EMBEDDED_SPEC, classifier: str | None = DEFAULT_CLASSIFIER, **options: Any
) -> CLIPerEngine:
    """One engine per (model, classifier, options) in this process: what the framework adapters use, so
    a LangChain and a LlamaIndex object naming the same model share one loaded model."""
    key = (model, None if classifier is None else str(classifier), tuple(sorted(options.items())))
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = CLIPerEngine(model, classifier=classifier, **options)
        return _SHARED[key]


def default_classifier_path(loaded: LoadedModel) -> Path | None:
    """The packaged classifier for ``loaded``, if one ships with the package."""
    folder = PACKAGED_CLASSIFIERS / loaded.name
    return folder if (folder / "classifier.json").is_file() else None
