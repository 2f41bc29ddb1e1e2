"""ChatCLIPer and CLIPerLLM on tiny models: per-user weights, the full protocol, tools, structured output."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.globals import set_llm_cache
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage, trim_messages
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel, Field

from cliper_integrations.core.errors import GenerationTimeoutError, InvalidRequestError
from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.core.tools import ToolsNotSupportedError
from cliper_integrations.langchain import ChatCLIPer, CLIPerLLM
from tests.tiny import HOLD_AT, forwards_when_left, held_forwards, loop_turns_while, tiny_classifier, tools_model

QUESTION = "Explain rain to a child"
JSON_RULE = "Respond only with one JSON object that follows this JSON schema: "


class Add(BaseModel):
    """Add two integers."""

    a: int = Field(description="first")
    b: int = Field(description="second")


ADD_TOOL = convert_to_openai_tool(Add)
FORCED = '<tool_call>\n{"name": "Add", "arguments": {'
ADD_CALL = FORCED + '"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, shared_classifier):
    return str(shared_classifier.save(tmp_path_factory.mktemp("lc-classifier")))


@pytest.fixture
def memory(tmp_path):
    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'prefs.sqlite3'}")
    memory.set("ann", {"concise": 1.0})
    memory.set("bob", {"informative": 1.0, "expert": 0.5})
    return memory


@pytest.fixture
def chat(base, classifier_folder, memory):
    return ChatCLIPer(model="tiny-base", classifier=classifier_folder, memory=memory, max_tokens=10, top_k=8)


def test_user_id_by_keyword_bind_and_config(chat):
    by_keyword = chat.invoke(QUESTION, user_id="ann")
    assert by_keyword.response_metadata["weights"] == {"concise": 8.0}
    assert by_keyword.response_metadata["weights_source"] == "memory"
    assert chat.bind(user_id="ann").invoke(QUESTION).content == by_keyword.content
    engine = chat.engine
    by_config = chat.invoke(QUESTION, config={"configurable": {"user_id": "ann"}})
    assert by_config.content == by_keyword.content and by_config.response_metadata["weights"] == {"concise": 8.0}
    bob = chat.invoke(QUESTION, config={"configurable": {"user_id": "bob"}})
    assert bob.response_metadata["weights"] == {"informative": 8.0, "expert": 4.0}
    assert bob.content != by_keyword.content
    assert chat.engine is engine  # per-call settings never rebuild or reload anything


def test_explicit_weights_override_memory_and_unknown_users_are_unguided(chat):
    explicit = chat.invoke(QUESTION, user_id="ann", weights={"friendly": 2})
    assert explicit.response_metadata["weights"] == {"friendly": 2.0}
    assert explicit.response_metadata["weights_source"] == "explicit"
    stranger = chat.invoke(QUESTION, user_id="stranger")
    assert stranger.response_metadata["weights"] == {}
    assert "no stored preferences" in stranger.response_metadata["weights_source"]
    assert stranger.content == chat.invoke(QUESTION).content


def test_default_weights_apply_without_a_user(base, classifier_folder):
    chat = ChatCLIPer(model="tiny-base", classifier=classifier_folder, weights={"P1B": 3}, max_tokens=6)
    assert chat.invoke(QUESTION).response_metadata["weights"] == {"expert": 3.0}


def test_a_stream_left_early_stops_decoding(base, chat):
    assert chat.invoke(QUESTION, max_tokens=60).usage_metadata["output_tokens"] == 60
    forwards, _ = forwards_when_left(base.model, chat.stream(QUESTION, max_tokens=60))
    assert forwards <= HOLD_AT + 1


def test_token_counts_are_the_models_own(base, chat):
    """LangChain's fallback counts GPT-2's tokens, loading that tokenizer from the Hub (offline, it fails)."""
    assert chat.get_token_ids(QUESTION) == base.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert CLIPerLLM(model="tiny-base").get_num_tokens(QUESTION) == len(chat.get_token_ids(QUESTION))
    conversation = [
        SystemMessage("Be brief."),
        HumanMessage(QUESTION),
        AIMessage("Rain is water."),
        HumanMessage("Why?"),
    ]
    counted = chat.get_num_tokens_from_messages(conversation)
    assert counted == chat.invoke(conversation, weights={}).usage_metadata["input_tokens"]
    assert chat.get_num_tokens_from_messages([]) == 0
    budget = chat.get_num_tokens_from_messages(conversation[-2:])
    trimmed = trim_messages(conversation, max_tokens=budget, token_counter=chat, strategy="last")
    assert trimmed == conversation[-2:]
    assert ChatCLIPer(model="tiny-base", custom_get_token_ids=lambda text: [0]).get_num_tokens(QUESTION) == 1


def test_timeout_bounds_a_call(base, chat):
    """LangChain's standard ``timeout``: a call past it raises, as a hosted model's would."""
    with held_forwards(base.model, release_after=0.3), pytest.raises(TimeoutError):
        chat.model_copy(update={"timeout": 0.2}).invoke(QUESTION, max_tokens=60)
    with held_forwards(base.model, release_after=0.3), pytest.raises(GenerationTimeoutError):
        chat.invoke(QUESTION, max_tokens=60, timeout=0.2)
    assert chat.invoke(QUESTION, max_tokens=60, timeout=60).usage_metadata["output_tokens"] == 60


def test_stream_and_async_forms_match_invoke(chat):
    whole = chat.invoke(QUESTION, user_id="bob")
    chunks = list(chat.stream(QUESTION, user_id="bob"))
    assert "".join(c.content for c in chunks) == whole.content
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.usage_metadata == whole.usage_metadata
    assert merged.response_metadata["weights"] == whole.response_metadata["weights"]

    async def run():
        awaited = await chat.ainvoke(QUESTION, user_id="bob")
        streamed = "".join([c.content async for c in chat.astream(QUESTION, user_id="bob")])
        return awaited.content, streamed

    assert asyncio.run(run()) == (whole.content, whole.content)
    streaming = chat.model_copy(update={"streaming": True})
    assert streaming.invoke(QUESTION, user_id="bob").content == whole.content


def test_async_calls_do_not_block_the_event_loop(chat):
    async def drain_stream():
        async for _ in chat.astream(QUESTION, max_tokens=40):
            pass

    async def run():
        return await loop_turns_while(chat.ainvoke(QUESTION, max_tokens=40)), await loop_turns_while(drain_stream())

    turns, stream_turns = asyncio.run(run())
    assert turns > 5 and stream_turns > 5


def test_stop_sequences_and_usage(chat):
    reference = chat.invoke(QUESTION, max_tokens=24).content
    stop = reference[4:9]
    stopped = chat.invoke(QUESTION, max_tokens=24, stop=[stop])
    assert stopped.content == reference[: reference.find(stop)]
    assert stopped.response_metadata["finish_reason"] == "stop"
    usage = stopped.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] < 24


def test_system_message_is_kept_and_non_text_content_refused(chat):
    with_system = chat.invoke([SystemMessage("Answer in French."), HumanMessage(QUESTION)])
    assert with_system.usage_metadata["input_tokens"] > chat.invoke(QUESTION).usage_metadata["input_tokens"]
    with pytest.raises(InvalidRequestError, match="image"):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": "http://x/y.png"}])])
    with pytest.raises(InvalidRequestError, match="Unsupported keyword"):
        chat.invoke(QUESTION, frequency_penalty=1.0)


def test_tools_on_a_template_without_tools_are_refused(chat):
    with pytest.raises(ToolsNotSupportedError, match="template"):
        chat.bind_tools([Add]).invoke("What is 2 plus 3?")


def test_two_instances_with_one_model_spec_share_the_engine(base, classifier_folder):
    chat = ChatCLIPer(model="tiny-base", classifier=classifier_folder, temperature=0.5)
    llm = CLIPerLLM(model="tiny-base", classifier=classifier_folder, max_tokens=3)
    assert chat.engine is llm.engine and chat.engine.model is base.model


def test_llm_batch_stream_and_user(base, classifier_folder, memory):
    llm = CLIPerLLM(model="tiny-base", classifier=classifier_folder, memory=memory, max_tokens=8, top_k=8)
    single = llm.invoke(QUESTION, user_id="ann")
    batch = llm.batch([QUESTION, "Hi"], user_id="ann")
    assert batch[0] == single
    assert "".join(llm.stream(QUESTION, user_id="ann")) == single
    assert asyncio.run(llm.ainvoke(QUESTION, user_id="ann")) == single
    result = llm.generate([QUESTION], user_id="ann")
    assert result.generations[0][0].generation_info["weights"] == {"concise": 8.0}


def _text(answer) -> str:
    return getattr(answer, "content", answer)


@pytest.fixture(params=[ChatCLIPer, CLIPerLLM], ids=["chat", "llm"])
def either(request, base, classifier_folder, memory):
    return request.param(model="tiny-base", classifier=classifier_folder, memory=memory, max_tokens=10, top_k=8)


@pytest.mark.parametrize("route", ["configurable", "metadata"])
def test_batch_answers_each_input_for_its_configs_user(either, route):
    """``BaseLLM.batch`` hands every input to one ``generate`` call, which answered them all for the first input's
    user (and ignored ``configurable``)."""
    ann, bob = (_text(either.invoke(QUESTION, user_id=user)) for user in ("ann", "bob"))
    assert ann != bob
    configs = [{route: {"user_id": "ann"}}, {route: {"user_id": "bob"}}]
    assert [_text(a) for a in either.batch([QUESTION, QUESTION], config=configs)] == [ann, bob]
    assert [_text(a) for a in asyncio.run(either.abatch([QUESTION, QUESTION], config=configs))] == [ann, bob]
    assert [_text(a) for a in either.batch([QUESTION, QUESTION], config={route: {"user_id": "bob"}})] == [bob, bob]


@pytest.fixture
def llm_cache():
    set_llm_cache(InMemoryCache())
    yield
    set_llm_cache(None)


def test_the_llm_cache_keeps_users_and_settings_apart(either, memory, classifier_folder, llm_cache):
    """LangChain keys its cache on the model's identifying parameters (a ``BaseLLM``'s only on those): with the
    model, classifier and top-k alone there, one user's cached answer was served to the next."""
    ask = {
        "keyword": lambda user: either.invoke(QUESTION, user_id=user),
        "configurable": lambda user: either.invoke(QUESTION, config={"configurable": {"user_id": user}}),
        "metadata": lambda user: either.invoke(QUESTION, config={"metadata": {"user_id": user}}),
    }
    set_llm_cache(None)
    ann, bob = (_text(either.invoke(QUESTION, user_id=user)) for user in ("ann", "bob"))
    for route, answer in ask.items():
        set_llm_cache(InMemoryCache())
        assert [_text(answer(user)) for user in ("ann", "bob", "ann")] == [ann, bob, ann], route
    memory.set("ann", {"informative": 1.0})  # her cached answer is no longer hers
    changed = _text(either.invoke(QUESTION, user_id="ann"))
    set_llm_cache(None)
    assert changed == _text(either.invoke(QUESTION, user_id="ann")) != ann
    concise, informative = (
        type(either)(model="tiny-base", classifier=classifier_folder, weights=weights, max_tokens=10, top_k=8)
        for weights in ({"concise": 3}, {"informative": 3})
    )
    set_llm_cache(None)
    uncached = _text(informative.invoke(QUESTION))
    set_llm_cache(InMemoryCache())
    assert _text(concise.invoke(QUESTION)) != uncached
    assert _text(informative.invoke(QUESTION)) == uncached


# --- tools and structured output on a tiny model that has memorised its answers -------------------

TOOL_QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


@pytest.fixture(scope="module")
def tools_chat(tmp_path_factory):
    schema = json.dumps(convert_to_json_schema(Add))
    loaded = tools_model(
        "tiny-tools",
        [
            (TOOL_QUESTION, [ADD_TOOL], "", ADD_CALL),
            (TOOL_QUESTION, [ADD_TOOL], FORCED, ADD_CALL[len(FORCED) :]),
            ([{"role": "system", "content": JSON_RULE + schema}, *TOOL_QUESTION], None, "{", '"a": 2, "b": 3}'),
            ([{"role": "user", "content": "Thanks"}], None, "", "You are welcome."),
        ],
    )
    folder = tiny_classifier(loaded).save(tmp_path_factory.mktemp("tools-classifier"))
    return ChatCLIPer(model="tiny-tools", classifier=str(folder), max_tokens=40, weights={"concise": 30, "P3A": 30})


def test_bind_tools_parses_tool_calls_under_strong_guidance(tools_chat):
    message = tools_chat.bind_tools([Add]).invoke("What is 2 plus 3?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Add"
    assert message.tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert message.response_metadata["weights"] == {"concise": 30.0, "friendly": 30.0}
    streamed = list(tools_chat.bind_tools([Add]).stream("What is 2 plus 3?"))
    # the same weights do steer ordinary text (here into an empty answer, which the engine's opening check
    # answers again from the base model's opening), so the tool call survived because guidance paused
    assert "answered again" in tools_chat.invoke("Thanks").response_metadata["warnings"][0]
    assert not tools_chat.invoke("Thanks", weights={}).response_metadata["warnings"]
    assert streamed[-1].tool_call_chunks[0]["name"] == "Add"


def test_token_counts_include_tool_schemas(tools_chat):
    with_tools = tools_chat.bind_tools([Add], tool_choice="auto").invoke("What is 2 plus 3?", weights={})
    counted = tools_chat.get_num_tokens_from_messages([HumanMessage("What is 2 plus 3?")], tools=[Add])
    assert counted == with_tools.usage_metadata["input_tokens"]
    assert counted > tools_chat.get_num_tokens_from_messages([HumanMessage("What is 2 plus 3?")])


def test_tool_messages_are_accepted_back(tools_chat):
    call = tools_chat.bind_tools([Add]).invoke("What is 2 plus 3?")
    history = [HumanMessage("What is 2 plus 3?"), call, ToolMessage("5", tool_call_id=call.tool_calls[0]["id"])]
    from cliper_integrations.core.prompting import render_chat
    from cliper_integrations.langchain.chat_models import to_chat_messages

    rendered = render_chat(tools_chat.engine.tokenizer, to_chat_messages(history), [ADD_TOOL])
    assert "<tool_response>\n5\n</tool_response>" in rendered and '"arguments": {"a": 2, "b": 3}' in rendered
    reply = tools_chat.bind_tools([Add]).invoke(history)
    assert isinstance(reply, AIMessage)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_parses_under_strong_weights(tools_chat, method):
    structured = tools_chat.with_structured_output(Add, method=method)
    assert structured.invoke("What is 2 plus 3?") == Add(a=2, b=3)
    raw = tools_chat.with_structured_output(Add, method=method, include_raw=True).invoke("What is 2 plus 3?")
    assert raw["parsed"] == Add(a=2, b=3) and raw["parsing_error"] is None
