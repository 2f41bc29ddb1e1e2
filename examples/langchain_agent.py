"""A LangGraph agent that remembers how each user wants to be answered (runs offline on the embedded model).

Tools: an ordinary ``lookup_fact`` and ``remember_preference``, which stores what the user says about
answers ("please keep it shorter") in ``PreferenceMemory``. The user's next answer is steered by it.

    python examples/langchain_agent.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Annotated

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langgraph.prebuilt import InjectedState, create_react_agent

from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.core.memory.statements import find_statements
from cliper_integrations.langchain import ChatCLIPer

FACTS = {
    "photosynthesis": "Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "tides": "Tides are caused mainly by the Moon's gravity pulling on the oceans.",
}
SYSTEM = (
    "You are a helpful assistant. When the user says how they want answers written (shorter, simpler, "
    "funnier, more detailed...), call remember_preference with their words. Use lookup_fact for facts."
)


def build_tools(memory: PreferenceMemory) -> list:
    @tool
    def lookup_fact(topic: str) -> str:
        """Look up a short fact about a topic."""
        return FACTS.get(topic.strip().lower(), f"No fact stored about {topic}.")

    @tool
    def remember_preference(state: Annotated[dict, InjectedState], config: RunnableConfig) -> str:
        """Remember how the user wants answers written (reads the user's own last message)."""
        said = next(m.content for m in reversed(state["messages"]) if isinstance(m, HumanMessage))
        changed = memory.learn_from_text(config["configurable"]["user_id"], str(said))
        return f"Saved: {', '.join(changed)}" if changed else "No preference recognised."

    return [lookup_fact, remember_preference]


def build_agent(llm: ChatCLIPer, memory: PreferenceMemory):
    tools = build_tools(memory)

    def choose_model(state: dict, runtime) -> object:
        """A 0.5B model picks tools unreliably, so the graph helps it: a message that states a preference
        forces the remember_preference call; after a tool result the model answers in words."""
        last = state["messages"][-1]
        if isinstance(last, HumanMessage) and find_statements(str(last.content)):
            return llm.bind_tools(tools, tool_choice="remember_preference")
        return llm.bind_tools(tools, tool_choice="none" if isinstance(last, ToolMessage) else "auto")

    return create_react_agent(choose_model, tools, prompt=SYSTEM)


def run(
    model: str = "embedded",
    classifier: str | None = "default",
    max_tokens: int = 120,
    database: str | None = None,
    user: str = "alice",
) -> dict:
    """Ask, state a preference, ask again; returns the answers and the stored weights."""
    memory = PreferenceMemory(database or f"sqlite:///{Path(tempfile.mkdtemp()) / 'prefs.sqlite3'}")
    llm = ChatCLIPer(model=model, classifier=classifier, memory=memory, max_tokens=max_tokens)
    if llm.engine.classifier is None:
        print(
            f"No guidance classifier for {llm.engine.loaded.name} yet: the stored preference is written "
            "into the prompt instead.\n"
        )
        llm = llm.model_copy(update={"guidance": False, "preference_prompt": True})
    agent = build_agent(llm, memory)
    config = {"configurable": {"user_id": user}}
    turns = ["What is photosynthesis?", "Please keep it shorter from now on.", "What is photosynthesis?"]
    answers = []
    for turn in turns:
        state = agent.invoke({"messages": [("user", turn)]}, config=config)
        answers.append(state["messages"][-1])
    return {"turns": turns, "answers": answers, "weights": memory.weights(user)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--classifier", default="default")
    args = parser.parse_args()
    outcome = run(args.model, args.classifier)
    for turn, answer in zip(outcome["turns"], outcome["answers"], strict=True):
        weights = answer.response_metadata.get("weights")
        print(f"user: {turn}\nassistant [{weights}]: {answer.content}\n")
    print(f"stored weights: {outcome['weights']}")


if __name__ == "__main__":
    main()
