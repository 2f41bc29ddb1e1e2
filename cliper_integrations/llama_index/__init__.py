"""LlamaIndex integration: ``CLIPerLLM``, a function-calling LLM personalized per user."""

from cliper_integrations.llama_index.base import CLIPerLLM

__all__ = ["CLIPerLLM"]
