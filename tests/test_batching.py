"""RequestBatcher and the engine's ``generate`` from many threads: shared batches, each caller its own outcome."""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cliper_integrations.core.batching import RequestBatcher
from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.errors import InvalidRequestError, NoClassifierError, UnknownClassError
from cliper_integrations.langchain import ChatCLIPer, CLIPerLLM
from cliper_integrations.llama_index import CLIPerLLM as LlamaIndexCLIPer
from tests.test_engine import PROMPTS, count_generate_calls

LONG_WINDOW = 30.0
"""Long enough that a batch in these tests forms only when ``max_rows`` calls wait, never by timing out."""


def from_threads(call, items):
    """``call`` on every item, each in a thread of its own, all started together; results or raised errors."""

    def outcome(item):
        try:
            return call(item)
        except BaseException as error:
            return error

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(outcome, items))


def with_executor_threads(threads, main):
    """``asyncio.run(main())`` on a loop whose default executor has ``threads`` threads, fewer than the calls the
    tests gather: calls that each held an executor thread while waiting could not all share a batch."""

    async def wrapped():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=threads))
        return await main()

    return asyncio.run(wrapped())


class Recorder:
    """An ``answer_batch`` that writes each request's prompt back and remembers the batches it was given."""

    def __init__(self, fails_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[threading.Thread] = set()
        self.fails_on = fails_on

    def __call__(self, requests):
        prompts = [request.prompt for request in requests]
        self.batches.append(prompts)
        self.threads.add(threading.current_thread())
        if self.fails_on in prompts:
            raise RuntimeError(f"cannot answer {self.fails_on}")
        return [GenerationResult(text=f"answer to {prompt}") for prompt in prompts]


def test_calls_that_arrive_together_share_one_batch_and_each_gets_its_own_answer():
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=LONG_WINDOW, max_rows=3)
    prompts = ["a", "b", "c"]
    results = from_threads(lambda prompt: batcher.answer(GenerationRequest(prompt)), prompts)
    assert [result.text for result in results] == ["answer to a", "answer to b", "answer to c"]
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == prompts


def test_a_batch_holds_at_most_max_rows_and_each_runs_on_a_caller_thread():
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=0.5, max_rows=2)
    prompts = list("abcde")
    callers: set[threading.Thread] = set()

    def call(prompt):
        callers.add(threading.current_thread())
        return batcher.answer(GenerationRequest(prompt))

    results = from_threads(call, prompts)
    assert [result.text for result in results] == [f"answer to {prompt}" for prompt in prompts]
    assert sorted(len(batch) for batch in recorder.batches) == [1, 2, 2]
    assert recorder.threads <= callers


def test_a_lone_call_is_answered_on_its_own_thread():
    """Torch computes slower on a second thread than on the one that ran it so far (an OpenMP pool per thread),
    so a call that no other joins must not move to a thread of the batcher's."""
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=0.01, max_rows=4)
    assert batcher.answer(GenerationRequest("a")).text == "answer to a"
    assert batcher.answer(GenerationRequest("b")).text == "answer to b"
    assert recorder.threads == {threading.current_thread()} and recorder.batches == [["a"], ["b"]]


def test_a_batch_that_raises_is_answered_row_by_row_so_only_its_cause_fails():
    recorder = Recorder(fails_on="bad")
    batcher = RequestBatcher(recorder, window=LONG_WINDOW, max_rows=3)
    outcomes = from_threads(lambda prompt: batcher.answer(GenerationRequest(prompt)), ["a", "bad", "c"])
    assert outcomes[0].text == "answer to a" and outcomes[2].text == "answer to c"
    assert isinstance(outcomes[1], RuntimeError) and "cannot answer bad" in str(outcomes[1])
    assert sorted(recorder.batches[0]) == ["a", "bad", "c"]
    assert sorted(recorder.batches[1:]) == [["a"], ["bad"], ["c"]]


def test_an_interrupted_batch_fails_its_callers_and_hands_on_the_lead():
    class Interrupted(BaseException):
        pass

    def answer_batch(requests):
        if any(request.prompt == "interrupted" for request in requests):
            raise Interrupted
        return [GenerationResult(text=f"answer to {request.prompt}") for request in requests]

    batcher = RequestBatcher(answer_batch, window=LONG_WINDOW, max_rows=2)
    outcomes = from_threads(lambda prompt: batcher.answer(GenerationRequest(prompt)), ["interrupted", "beside it"])
    assert all(isinstance(outcome, Interrupted) for outcome in outcomes)
    batcher.max_rows = 1
    assert batcher.answer(GenerationRequest("after")).text == "answer to after"


def test_a_call_made_from_inside_a_batch_does_not_wait_for_itself():
    def answer_batch(requests):
        inner = [batcher.answer(GenerationRequest("inner")).text] if requests[0].prompt == "outer" else []
        return [GenerationResult(text=" ".join([*inner, request.prompt])) for request in requests]

    batcher = RequestBatcher(answer_batch, window=0.01, max_rows=4)
    results = from_threads(batcher.answer, [GenerationRequest("outer")])
    assert results[0].text == "inner outer"


def test_async_calls_share_one_batch_led_by_the_batchers_thread():
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=LONG_WINDOW, max_rows=8)
    prompts = [f"question {number}" for number in range(8)]

    async def together():
        return await asyncio.gather(*(batcher.aanswer(GenerationRequest(prompt)) for prompt in prompts))

    assert [result.text for result in asyncio.run(together())] == [f"answer to {prompt}" for prompt in prompts]
    assert recorder.batches == [prompts]
    assert [thread.name for thread in recorder.threads] == ["cliper-batch-leader"]


def test_sync_and_async_calls_share_a_batch():
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=LONG_WINDOW, max_rows=3)

    async def two_async_calls():
        return await asyncio.gather(*(batcher.aanswer(GenerationRequest(prompt)) for prompt in ("a", "b")))

    with ThreadPoolExecutor(max_workers=1) as pool:
        blocking = pool.submit(batcher.answer, GenerationRequest("sync"))
        assert [result.text for result in asyncio.run(two_async_calls())] == ["answer to a", "answer to b"]
        assert blocking.result().text == "answer to sync"
    assert len(recorder.batches) == 1 and sorted(recorder.batches[0]) == ["a", "b", "sync"]


def test_a_cancelled_async_call_leaves_the_queue_and_the_lead():
    recorder = Recorder()
    batcher = RequestBatcher(recorder, window=LONG_WINDOW, max_rows=4)

    async def main():
        leader = asyncio.create_task(batcher.aanswer(GenerationRequest("cancelled leader")))
        second = asyncio.create_task(batcher.aanswer(GenerationRequest("cancelled")))
        first = asyncio.create_task(batcher.aanswer(GenerationRequest("a")))
        await asyncio.sleep(0)  # all three wait in the queue, one fewer than a batch takes at once
        for cancelled in (leader, second):
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
        return await asyncio.gather(first, *(batcher.aanswer(GenerationRequest(prompt)) for prompt in "cde"))

    assert [result.text for result in asyncio.run(main())] == [f"answer to {prompt}" for prompt in "acde"]
    assert recorder.batches == [["a", "c", "d", "e"]]


def test_a_call_cancelled_while_its_batch_runs_leaves_the_others_their_answers():
    started, finish = threading.Event(), threading.Event()

    def answer_batch(requests):
        started.set()
        finish.wait(LONG_WINDOW)
        return [GenerationResult(text=f"answer to {request.prompt}") for request in requests]

    batcher = RequestBatcher(answer_batch, window=LONG_WINDOW, max_rows=2)

    async def main():
        cancelled = asyncio.create_task(batcher.aanswer(GenerationRequest("cancelled")))
        kept = asyncio.create_task(batcher.aanswer(GenerationRequest("kept")))
        await asyncio.to_thread(started.wait, LONG_WINDOW)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        finish.set()
        return await kept

    assert asyncio.run(main()).text == "answer to kept"
    batcher.max_rows = 1
    assert batcher.answer(GenerationRequest("after")).text == "answer to after"


def test_cancelling_the_call_whose_batch_runs_starts_no_second_batch_beside_it():
    running, finish = threading.Semaphore(0), threading.Event()
    batches: list[list[str]] = []

    def answer_batch(requests):
        batches.append([request.prompt for request in requests])
        running.release()
        finish.wait(LONG_WINDOW)
        return [GenerationResult(text=f"answer to {request.prompt}") for request in requests]

    batcher = RequestBatcher(answer_batch, window=0.0, max_rows=1)

    async def main():
        leading = asyncio.create_task(batcher.aanswer(GenerationRequest("leading")))
        await asyncio.to_thread(running.acquire, timeout=LONG_WINDOW)
        waiting = asyncio.create_task(asyncio.to_thread(batcher.answer, GenerationRequest("waiting")))
        await asyncio.sleep(0.1)  # the sync call waits in the queue
        leading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leading
        second_batch_began = await asyncio.to_thread(running.acquire, timeout=0.5)
        finish.set()
        return second_batch_began, await waiting

    second_batch_began, answered = asyncio.run(main())
    assert not second_batch_began and answered.text == "answer to waiting"
    assert batches == [["leading"], ["waiting"]]


@pytest.fixture
def batching_engine(base, classifier):
    return CLIPerEngine(base, classifier=classifier, top_k=8, batch_window=LONG_WINDOW, max_batch_size=3)


def test_engine_answers_concurrent_generate_calls_in_one_decoding_pass(base, classifier, batching_engine, monkeypatch):
    requests = [GenerationRequest(prompt, weights={"expert": 4}, max_new_tokens=10) for prompt in PROMPTS]
    alone = [CLIPerEngine(base, classifier=classifier, top_k=8).generate_batch([r])[0].text for r in requests]
    calls = count_generate_calls(base, monkeypatch)
    results = from_threads(batching_engine.generate, requests)
    assert [result.text for result in results] == alone
    assert calls and set(calls) == {3}  # the refusal look-ahead and the answer, each over all three rows


def test_bad_requests_among_concurrent_calls_fail_only_their_callers(batching_engine):
    good = GenerationRequest(PROMPTS[0], weights={"expert": 4}, max_new_tokens=8)
    outcomes = from_threads(
        batching_engine.generate,
        [good, GenerationRequest(PROMPTS[1], weights={"verbose": 1}), GenerationRequest(PROMPTS[2], max_new_tokens=0)],
    )
    assert isinstance(outcomes[1], UnknownClassError) and isinstance(outcomes[2], InvalidRequestError)
    assert outcomes[0].text == batching_engine.generate_batch([good])[0].text and outcomes[0].error is None


def test_engine_answers_concurrent_async_calls_in_one_pass_with_one_executor_thread(
    base, classifier, batching_engine, monkeypatch
):
    requests = [GenerationRequest(prompt, weights={"expert": 4}, max_new_tokens=10) for prompt in PROMPTS]
    alone = [CLIPerEngine(base, classifier=classifier, top_k=8).generate_batch([r])[0].text for r in requests]
    calls = count_generate_calls(base, monkeypatch)

    async def together():
        return await asyncio.gather(*(batching_engine.agenerate(request) for request in requests))

    assert [result.text for result in with_executor_threads(1, together)] == alone
    assert calls and set(calls) == {3}


def test_bad_requests_among_concurrent_async_calls_fail_only_their_callers(batching_engine):
    good = GenerationRequest(PROMPTS[0], weights={"expert": 4}, max_new_tokens=8)
    bad = [GenerationRequest(PROMPTS[1], weights={"verbose": 1}), GenerationRequest(PROMPTS[2], max_new_tokens=0)]

    async def together():
        return await asyncio.gather(*(batching_engine.agenerate(r) for r in (good, *bad)), return_exceptions=True)

    outcomes = asyncio.run(together())
    assert isinstance(outcomes[1], UnknownClassError) and isinstance(outcomes[2], InvalidRequestError)
    assert outcomes[0].text == batching_engine.generate_batch([good])[0].text and outcomes[0].error is None


def test_a_seeded_sample_does_not_depend_on_the_calls_it_arrives_with(base, classifier, batching_engine, monkeypatch):
    """Rows sampled with seeds of their own, at other temperatures, or greedily share one batch, and each seeded
    row draws what it draws alone."""
    requests = [
        GenerationRequest(PROMPTS[0], weights={"friendly": 2}, max_new_tokens=12, temperature=1.5, seed=7),
        GenerationRequest(PROMPTS[1], weights={"friendly": 2}, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=8),
        GenerationRequest(PROMPTS[2], max_new_tokens=12),
    ]
    alone = [CLIPerEngine(base, classifier=classifier, top_k=8).generate_batch([r])[0].text for r in requests]
    calls = count_generate_calls(base, monkeypatch)
    results = from_threads(batching_engine.generate, requests)
    assert [result.text for result in results] == alone
    assert calls and set(calls) == {3}


def answers_alone(engine, prompts, max_new_tokens=8):
    """Each prompt's answer decoded in a batch of its own: what a gathered call must answer too."""
    return [engine.generate_batch([GenerationRequest(p, max_new_tokens=max_new_tokens)])[0].text for p in prompts]


@pytest.fixture
def chat_of_eight(base, monkeypatch):
    """A chat model whose shared engine answers eight calls in one batch once all eight wait, eight prompts, their
    answers alone, and the batch sizes of the decoding calls made from then on."""
    chat = ChatCLIPer(model="tiny-base", classifier=None, max_tokens=8)
    monkeypatch.setattr(chat.engine.batcher, "window", LONG_WINDOW)  # the engine is shared: set back after
    monkeypatch.setattr(chat.engine.batcher, "max_rows", 8)
    prompts = [f"{prompt} ({number})" for number in range(3) for prompt in PROMPTS][:8]
    alone = answers_alone(chat.engine, prompts)
    return chat, prompts, alone, count_generate_calls(base, monkeypatch)


def test_langchain_batch_reaches_the_engine_as_one_batch(chat_of_eight, monkeypatch):
    """Eight inputs: more than the executor's default threads on a 2-core machine (CPU cores + 4), so ``batch``
    must raise ``max_concurrency`` for all eight calls to arrive together."""
    chat, prompts, alone, calls = chat_of_eight
    assert [message.content for message in chat.batch(prompts)] == alone
    assert calls == [8]
    monkeypatch.setattr(chat.engine.batcher, "window", 0.01)
    assert [message.content for message in chat.batch(prompts[:2], config={"max_concurrency": 1})] == alone[:2]
    assert calls == [8, 1, 1]  # a max_concurrency of the caller's is kept


def test_langchain_abatch_reaches_the_engine_as_one_batch(chat_of_eight):
    chat, prompts, alone, calls = chat_of_eight

    async def together():
        return await chat.abatch(prompts)

    assert [message.content for message in with_executor_threads(2, together)] == alone
    assert calls == [8]


def test_concurrent_langchain_text_completion_calls_reach_the_engine_as_one_batch(base, monkeypatch):
    """``CLIPerLLM.invoke`` from threads of their own (a server, a thread pool), and concurrent ``ainvoke`` calls."""
    llm = CLIPerLLM(model="tiny-base", classifier=None, max_tokens=8, batch_window=LONG_WINDOW)
    monkeypatch.setattr(llm.engine.batcher, "max_rows", 3)
    alone = answers_alone(llm.engine, PROMPTS)
    calls = count_generate_calls(base, monkeypatch)
    assert from_threads(llm.invoke, PROMPTS) == alone
    assert calls == [3]

    async def together():
        return await asyncio.gather(*(llm.ainvoke(prompt) for prompt in PROMPTS))

    assert with_executor_threads(1, together) == alone
    assert calls == [3, 3]


def test_concurrent_llama_index_async_calls_reach_the_engine_as_one_batch(base, monkeypatch):
    llm = LlamaIndexCLIPer(model="tiny-base", classifier=None, max_tokens=8, batch_window=LONG_WINDOW)
    monkeypatch.setattr(llm.engine.batcher, "max_rows", 3)
    alone = answers_alone(llm.engine, PROMPTS)
    calls = count_generate_calls(base, monkeypatch)

    async def together():
        return await asyncio.gather(*(llm.acomplete(prompt) for prompt in PROMPTS))

    assert [response.text for response in with_executor_threads(1, together)] == alone
    assert calls == [3]


def test_a_negative_batch_window_is_refused(base):
    with pytest.raises(InvalidRequestError, match="batch_window"):
        CLIPerEngine(base, classifier=None, batch_window=-1)
    with pytest.raises(ValueError, match="batch_window"):
        ChatCLIPer(model="tiny-base", classifier=None, batch_window=-0.5)


def test_a_copy_of_an_engine_answers_its_calls_with_its_own_settings(base, classifier):
    """The bench and scripts copy an engine to change a setting: the copy's calls must not reach the original's
    batcher, which would answer them with the original's settings."""
    engine = CLIPerEngine(base, classifier=classifier, top_k=8)
    copied = copy.copy(engine)
    copied.classifier = None
    request = GenerationRequest(PROMPTS[0], weights={"expert": 4}, max_new_tokens=4)
    with pytest.raises(NoClassifierError):
        copied.generate(request)
    assert engine.generate(request).weights == {"expert": 4.0}
