"""LangChain's standard unit test-suite for ChatCLIPer (langchain-tests, pinned), on a tiny model."""

from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from cliper_integrations.langchain import ChatCLIPer


@pytest.fixture(autouse=True)
def _tiny_model_registered(base):
    """The spec "tiny-base" resolves to the session's tiny model."""


class TestChatCLIPerUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatCLIPer]:
        return ChatCLIPer

    @property
    def chat_model_params(self) -> dict:
        return {"model": "tiny-base", "classifier": None}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
