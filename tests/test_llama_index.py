"""CLIPerLLM for LlamaIndex on tiny models: protocol, per-call kwargs, users, callbacks, tools."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from cliper_integrations.core.errors import GenerationTimeoutError, InvalidRequestError
from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.langchain import ChatCLIPer
from cliper_integrations.llama_index import CLIPerLLM
from tests.tiny import (
    HOLD_AT,
    forwards_when_left,
    held_forwards,
    loop_turns_while,
    tiny_classifier,
    tiny_loaded,
    tools_model,
)

QUESTION = "Explain rain to a child"


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, shared_classifier):
    return str(shared_classifier.save(tmp_path_factory.mktemp("li-classifier")))


@pytest.fixture
def llm(base, classifier_folder, tmp_path):
    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'prefs.sqlite3'}")
    memory.set("ann", {"concise": 1.0})
    return CLIPerLLM(model="tiny-base", classifier=classifier_folder, memory=memory, max_tokens=10, top_k=8)


def test_metadata(llm):
    metadata = llm.metadata
    assert metadata.context_window == 256 and metadata.num_output == 10 and metadata.model_name == "tiny-base"
    assert metadata.is_chat_model and metadata.is_function_calling_model


def test_a_stream_left_early_stops_decoding(base, llm):
    messages = [ChatMessage(role="user", content=QUESTION)]
    assert llm.chat(messages, max_tokens=60).raw["usage"]["output_tokens"] == 60
    forwards, _ = forwards_when_left(base.model, llm.stream_chat(messages, max_tokens=60))
    assert forwards <= HOLD_AT + 1


def test_timeout_bounds_a_call(base, llm):
    with held_forwards(base.model, release_after=0.3), pytest.raises(GenerationTimeoutError):
        llm.complete(QUESTION, max_tokens=60, timeout=0.2)


def test_complete_chat_stream_and_async_agree(llm):
    whole = llm.complete(QUESTION, user_id="ann")
    assert whole.additional_kwargs["weights"] == {"concise": 8.0}
    streamed = list(llm.stream_complete(QUESTION, user_id="ann"))
    assert streamed[-1].text == whole.text and "".join(r.delta for r in streamed) == whole.text
    chat = llm.chat([ChatMessage(role="user", content=QUESTION)], user_id="ann")
    assert chat.message.content == whole.text and chat.message.role == "assistant"
    chat_stream = list(llm.stream_chat([ChatMessage(role="user", content=QUESTION)], user_id="ann"))
    assert chat_stream[-1].message.content == whole.text

    async def run():
        completed = await llm.acomplete(QUESTION, user_id="ann")
        chatted = await llm.achat([ChatMessage(role="user", content=QUESTION)], user_id="ann")
        deltas = [r.delta async for r in await llm.astream_complete(QUESTION, user_id="ann")]
        chat_deltas = [
            r.delta async for r in await llm.astream_chat([ChatMessage(role="user", content=QUESTION)], user_id="ann")
        ]
        return completed.text, chatted.message.content, "".join(deltas), "".join(d or "" for d in chat_deltas)

    assert asyncio.run(run()) == (whole.text,) * 4


def test_per_call_generation_kwargs_are_honoured(llm):
    short = llm.complete(QUESTION, max_tokens=3)
    assert short.additional_kwargs["usage"]["output_tokens"] <= 3
    reference = llm.complete(QUESTION, max_tokens=24).text
    stop = reference[3:7]
    assert llm.complete(QUESTION, max_tokens=24, stop=[stop]).text == reference[: reference.find(stop)]
    sampled = llm.complete(QUESTION, temperature=0.9, top_p=0.9, seed=5, max_tokens=12).text
    assert sampled == llm.complete(QUESTION, temperature=0.9, top_p=0.9, seed=5, max_tokens=12).text
    assert llm.complete(QUESTION, weights={"expert": 2}).additional_kwargs["weights"] == {"expert": 2.0}
    with pytest.raises(InvalidRequestError, match="num_beams"):
        llm.complete(QUESTION, num_beams=4)


def test_for_user_is_a_light_view_sharing_the_engine(llm, classifier_folder):
    alice = llm.for_user("ann")
    assert alice.engine is llm.engine
    assert alice.complete(QUESTION).text == llm.complete(QUESTION, user_id="ann").text
    stranger = llm.for_user("stranger").complete(QUESTION)
    assert stranger.additional_kwargs["weights"] == {}
    assert "no stored preferences" in stranger.additional_kwargs["weights_source"]
    assert ChatCLIPer(model="tiny-base", classifier=classifier_folder, top_k=8).engine is llm.engine


def test_callbacks_and_instrumentation_fire(llm):
    debug = LlamaDebugHandler()
    observed = []

    class Recorder(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "Recorder"

        def handle(self, event, **kwargs) -> None:
            observed.append(type(event).__name__)

    dispatcher = get_dispatcher()
    recorder = Recorder()
    dispatcher.add_event_handler(recorder)
    try:
        traced = llm.model_copy(update={"callback_manager": CallbackManager([debug])})
        traced.complete(QUESTION)
        traced.chat([ChatMessage(role="user", content=QUESTION)])
    finally:
        dispatcher.event_handlers.remove(recorder)
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 2
    assert {"LLMCompletionStartEvent", "LLMCompletionEndEvent", "LLMChatStartEvent", "LLMChatEndEvent"} <= set(observed)


def test_async_does_not_block_the_event_loop(llm):
    assert asyncio.run(loop_turns_while(llm.acomplete(QUESTION, max_tokens=40))) > 5


def test_prompt_longer_than_the_context_follows_the_engine_policy(tokenizer):
    tiny_loaded("tiny-li-small", seed=0, tokenizer=tokenizer, context=64)
    llm = CLIPerLLM(model="tiny-li-small", classifier=None, max_tokens=8)
    with pytest.warns(UserWarning, match="truncated from the left"):
        response = llm.complete("The quick brown fox jumps over the lazy dog. " * 20)
    assert response.additional_kwargs["warnings"]


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


ADD_TOOL = FunctionTool.from_defaults(add)
QUESTION_MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
FORCED = '<tool_call>\n{"name": "'


@pytest.fixture(scope="module")
def tools_llm(tmp_path_factory):
    spec = ADD_TOOL.metadata.to_openai_tool()
    loaded = tools_model(
        "tiny-li-tools",
        [
            (QUESTION_MESSAGES, [spec], "", CALL),
            (QUESTION_MESSAGES, [spec], FORCED, CALL[len(FORCED) :]),
            ([{"role": "user", "content": "Thanks"}], None, "", "You are welcome."),
        ],
    )
    folder = tiny_classifier(loaded).save(tmp_path_factory.mktemp("li-tools-classifier"))
    return CLIPerLLM(model="tiny-li-tools", classifier=str(folder), max_tokens=40, weights={"concise": 30, "P3A": 30})


@pytest.mark.parametrize("tool_required", [False, True])
def test_chat_with_tools_under_strong_guidance(tools_llm, tool_required):
    response = tools_llm.chat_with_tools([ADD_TOOL], user_msg="What is 2 plus 3?", tool_required=tool_required)
    calls = tools_llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert response.additional_kwargs["weights"] == {"concise": 30.0, "friendly": 30.0}
    streamed = list(tools_llm.stream_chat_with_tools([ADD_TOOL], user_msg="What is 2 plus 3?"))
    assert tools_llm.get_tool_calls_from_response(streamed[-1])[0].tool_name == "add"
    with pytest.raises(ValueError, match="Expected at least one tool call"):
        tools_llm.get_tool_calls_from_response(tools_llm.chat([ChatMessage(role="user", content="Thanks")]))
