"""LangChain integration: ``ChatCLIPer`` (chat model) and ``CLIPerLLM`` (completion model)."""

from cliper_integrations.langchain.chat_models import ChatCLIPer
from cliper_integrations.langchain.llms import CLIPerLLM

__all__ = ["CLIPerLLM", "ChatCLIPer"]
