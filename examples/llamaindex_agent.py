"""A LlamaIndex ``FunctionAgent`` with a tool, answering each user in their own style (offline, embedded model).

``FunctionAgent`` is used, not ``ReActAgent``: the default Qwen2.5 model's chat template has native
tool calling, which ``CLIPerLLM`` renders and parses (guidance is off inside tool-call spans), and it
picks the right tool and arguments there, while with ReActAgent's text format it invented arguments
(``{"input": "hello world"}``). After a tool result the 0.5B model tends to call the same tool again,
so ``answer_after_tool_result=True`` offers no tools on that turn and it answers in words.

    python examples/llamaindex_agent.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from llama_index.core.agent.workflow import FunctionAgent
from llama_index.core.tools import FunctionTool

from cliper_integrations.core.memory import PreferenceMemory
from cliper_integrations.llama_index import CLIPerLLM

TEMPERATURES = {"paris": 14, "oslo": 3, "cairo": 29}
PROFILES = {"kid": {"elementary": 1.0, "friendly": 0.8}, "meteorologist": {"expert": 1.0, "concise": 0.8}}
QUESTION = "What is the temperature in Oslo right now?"
SYSTEM_PROMPT = "You answer questions about the weather. Use the tool for readings."


def get_temperature(city: str) -> str:
    """Current temperature in a city, in degrees Celsius."""
    found = TEMPERATURES.get(city.strip().lower())
    return f"{found} °C in {city}" if found is not None else f"No reading for {city}."


async def ask(llm: CLIPerLLM, user: str, question: str) -> str:
    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(get_temperature)],
        llm=llm.for_user(user),
        system_prompt="You answer questions about the weather. Use the tool for readings.",
    )
    return str(await agent.run(question))


def run(
    model: str = "embedded", classifier: str | None = "default", max_tokens: int = 96, database: str | None = None
) -> dict[str, str]:
    memory = PreferenceMemory(database or f"sqlite:///{Path(tempfile.mkdtemp()) / 'prefs.sqlite3'}")
    for user, profile in PROFILES.items():
        memory.set(user, profile, reason="example profile")
    llm = CLIPerLLM(
        model=model, classifier=classifier, memory=memory, max_tokens=max_tokens, answer_after_tool_result=True
    )
    if llm.engine.classifier is None:
        print(f"No guidance classifier for {llm.engine.loaded.name} yet: preferences go into the prompt.\n")
        llm = llm.model_copy(update={"guidance": False, "preference_prompt": True})
    return {user: asyncio.run(ask(llm, user, QUESTION)) for user in PROFILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--classifier", default="default")
    args = parser.parse_args()
    for user, answer in run(args.model, args.classifier).items():
        print(f"[{user}] {answer}\n")


if __name__ == "__main__":
    main()
