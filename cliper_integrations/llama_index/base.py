"""``CLIPerLLM`` for LlamaIndex: a ``FunctionCallingLLM`` personalized per user at decode time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.errors import InvalidRequestError
from cliper_integrations.core.settings import GenerationSettings
from cliper_integrations.core.tools import parse_tool_calls, tool_call_prefix

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> chat-template messages; tool calls and tool results kept."""
    converted = []
    for message in messages:
        texts = []
        for block in message.blocks:
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif not isinstance(block, ToolCallBlock):  # tool calls are rendered from tool_calls below
                raise InvalidRequestError(f"This model reads text only; got a {block.block_type!r} block")
        entry: dict[str, Any] = {"role": message.role.value, "content": "".join(texts)}
        calls = message.additional_kwargs.get("tool_calls") or [
            {"id": b.tool_call_id, "type": "function", "function": {"name": b.tool_name, "arguments": b.tool_kwargs}}
            for b in message.blocks
            if isinstance(b, ToolCallBlock)
        ]
        if calls:
            entry["tool_calls"] = calls
        if message.role == MessageRole.TOOL:
            entry["tool_call_id"] = message.additional_kwargs.get("tool_call_id")
        converted.append(entry)
    return converted


class CLIPerLLM(GenerationSettings, FunctionCallingLLM):
    """A local LLM steered per user by a preference classifier (CLIPer), for query engines and agents.

    .. code-block:: python

        from cliper_integrations.llama_index import CLIPerLLM

        llm = CLIPerLLM(model="embedded", memory="sqlite:///prefs.sqlite3")
        index.as_query_engine(llm=llm.for_user("alice")).query("What is DNS?")
        llm.complete("Explain DNS.", user_id="bob", weights={"expert": 3})

    The engine (model, tokenizer, classifier) is shared per process with every other CLIPer object
    naming the same model spec. Tool-call spans are decoded with guidance off.
    """

    @classmethod
    def class_name(cls) -> str:
        return "CLIPerLLM"

    @property
    def metadata(self) -> LLMMetadata:
        loaded = self.engine.loaded
        return LLMMetadata(
            context_window=loaded.context_window,
            num_output=self.max_tokens,
            model_name=loaded.name,
            is_chat_model=True,
            is_function_calling_model=True,
        )

    def for_user(self, user_id: str) -> CLIPerLLM:
        """A light view of this LLM that answers as ``user_id`` wants; shares the engine."""
        return self.model_copy(update={"user_id": user_id})

    # --- requests and responses ------------------------------------------------------------------

    def _chat_request(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[CLIPerEngine, GenerationRequest]:
        options = dict(kwargs)
        engine = self.engine_for(options)
        tools = options.pop("tools", None)
        choice = options.pop("tool_choice", None)
        if options.pop("tool_required", False) and choice is None:
            choice = "required"
        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = tools
            extra["response_prefix"] = tool_call_prefix(choice, [t["function"]["name"] for t in tools])
        return engine, self.build_request(to_chat_messages(messages), None, options, **extra)

    def _completion_request(self, prompt: str, formatted: bool, kwargs: dict[str, Any]):
        options = dict(kwargs)
        engine = self.engine_for(options)
        return engine, self.build_request(prompt, None, options, raw_prompt=formatted)

    def _chat_response(
        self,
        engine: CLIPerEngine,
        request: GenerationRequest,
        result: GenerationResult,
        delta: str | None = None,
        text: str | None = None,
    ) -> ChatResponse:
        text = request.response_prefix + result.text if text is None else text
        metadata = self.result_metadata(engine, result)
        kwargs: dict[str, Any] = {}
        if request.tools:
            parsed = parse_tool_calls(text)
            text = parsed.content
            kwargs["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in parsed.calls
            ]
            if parsed.invalid:
                kwargs["invalid_tool_calls"] = parsed.invalid
        message = ChatMessage(role=MessageRole.ASSISTANT, content=text, additional_kwargs=kwargs)
        return ChatResponse(message=message, delta=delta, raw=metadata, additional_kwargs=metadata)

    def _stream_chat(self, engine: CLIPerEngine, request: GenerationRequest) -> ChatResponseGen:
        if request.tools:  # tool calls are parsed from the whole text
            result = engine.generate(request)
            yield self._chat_response(engine, request, result, delta=request.response_prefix + result.text)
            return
        stream = engine.stream(request)
        text = ""
        for delta in stream:
            text += delta
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
        yield self._chat_response(engine, request, stream.result, delta="", text=text)

    # --- the LLM protocol ------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        engine, request = self._chat_request(messages, kwargs)
        return self._chat_response(engine, request, engine.generate(request))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        engine, request = self._chat_request(messages, kwargs)
        return self._chat_response(engine, request, await engine.agenerate(request))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        engine, request = self._completion_request(prompt, formatted, kwargs)
        result = engine.generate(request)
        metadata = self.result_metadata(engine, result)
        return CompletionResponse(text=result.text, raw=metadata, additional_kwargs=metadata)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        engine, request = self._completion_request(prompt, formatted, kwargs)
        result = await engine.agenerate(request)
        metadata = self.result_metadata(engine, result)
        return CompletionResponse(text=result.text, raw=metadata, additional_kwargs=metadata)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        engine, request = self._chat_request(messages, kwargs)
        return self._stream_chat(engine, request)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        engine, request = self._chat_request(messages, kwargs)

        async def generator() -> ChatResponseAsyncGen:
            if request.tools:
                result = await engine.agenerate(request)
                yield self._chat_response(engine, request, result, delta=request.response_prefix + result.text)
                return
            stream = engine.stream(request)
            text = ""
            async for delta in stream:
                text += delta
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)
            yield self._chat_response(engine, request, stream.result, delta="", text=text)

        return generator()

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        engine, request = self._completion_request(prompt, formatted, kwargs)

        def generator() -> CompletionResponseGen:
            stream = engine.stream(request)
            text = ""
            for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            metadata = self.result_metadata(engine, stream.result)
            yield CompletionResponse(text=text, delta="", raw=metadata, additional_kwargs=metadata)

        return generator()

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        engine, request = self._completion_request(prompt, formatted, kwargs)

        async def generator() -> CompletionResponseAsyncGen:
            stream = engine.stream(request)
            text = ""
            async for delta in stream:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            metadata = self.result_metadata(engine, stream.result)
            yield CompletionResponse(text=text, delta="", raw=metadata, additional_kwargs=metadata)

        return generator()

    # --- function calling ------------------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(
                user_msg if isinstance(user_msg, ChatMessage) else ChatMessage(role="user", content=user_msg)
            )
        specs = [tool.metadata.to_openai_tool() for tool in tools]
        return {"messages": messages, "tools": specs, "tool_required": tool_required, **kwargs}

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, got none: {response.message.content!r}")
        return [
            ToolSelection(
                tool_id=call["id"],
                tool_name=call["function"]["name"],
                tool_kwargs=call["function"]["arguments"]
                if isinstance(call["function"]["arguments"], dict)
                else json.loads(call["function"]["arguments"]),
            )
            for call in calls
        ]
