"""``ChatCLIPer``: a LangChain chat model whose answers are personalized per user at decode time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputKeyToolsParser, JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough
from langchain_core.runnables.config import get_config_list
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from cliper_integrations.core.engine import CLIPerEngine, GenerationRequest, GenerationResult
from cliper_integrations.core.errors import InvalidRequestError
from cliper_integrations.core.tools import parse_tool_calls, tool_call_prefix
from cliper_integrations.langchain._common import CLIPerParams

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def _text(content: str | list) -> str:
    """Text of a message; content blocks other than text cannot reach a text-only model."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # an AI message's tool calls also stand in ``tool_calls``, rendered from there
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidRequestError(f"This model reads text only; got a {kind!r} content block")
    return "".join(parts)


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> chat-template messages; tool calls and tool results kept, nothing dropped."""
    converted = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(message.type, message.type)
        entry: dict[str, Any] = {"role": role, "content": _text(message.content)}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [
                {
                    "type": "function",
                    "id": call.get("id"),
                    "function": {"name": call["name"], "arguments": call["args"]},
                }
                for call in message.tool_calls
            ]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
            if message.name:
                entry["name"] = message.name
        converted.append(entry)
    return converted


def _usage(result: GenerationResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens, total_tokens=result.total_tokens
    )


class ChatCLIPer(CLIPerParams, BaseChatModel):
    """Chat model on a local LLM, steered per user by a preference classifier (CLIPer).

    Setup:
        ``pip install 'cliper-integrations[langchain,embedded]'``

    Instantiate:
        .. code-block:: python

            from cliper_integrations.langchain import ChatCLIPer

            llm = ChatCLIPer(model="embedded", memory="sqlite:///prefs.db", max_tokens=200)

    Per user:
        .. code-block:: python

            llm.invoke("Explain DNS.", user_id="alice")                      # keyword
            llm.bind(user_id="alice").invoke("Explain DNS.")                  # bound
            llm.invoke("Explain DNS.", config={"configurable": {"user_id": "alice"}})
            llm.invoke("Explain DNS.", weights={"concise": 4})                # explicit weights win

    The weights used are in ``response_metadata["weights"]`` (and where they came from in
    ``response_metadata["weights_source"]``). Tool calls and JSON output are written with guidance off.
    """

    @property
    def _llm_type(self) -> str:
        return "cliper-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        return self.ls_params("chat", stop, kwargs)

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """LangChain's cache key for a call: its settings, keywords included, and the weights stored for its user."""
        return super(ChatCLIPer, self.with_call_settings(kwargs))._get_llm_string(stop, **kwargs)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The tokens the model reads for ``messages`` (and ``tools``): rendered by its chat template, as a call
        renders them before any preference request is added, so ``trim_messages(token_counter=chat)`` fits a
        conversation to ``max_tokens`` of the model's own tokens."""
        if self.custom_get_token_ids is not None:
            return super().get_num_tokens_from_messages(messages, tools)
        schemas = [convert_to_openai_tool(tool) for tool in tools] if tools else None
        return self.engine.prompt_tokens(to_chat_messages(messages), schemas)

    # --- requests --------------------------------------------------------------------------------

    def _chat_request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[CLIPerEngine, GenerationRequest]:
        options = dict(kwargs)
        tools = options.pop("tools", None)
        tool_choice = options.pop("tool_choice", None)
        response_format = options.pop("response_format", None)
        chat = to_chat_messages(messages)
        extra: dict[str, Any] = {}
        if tools and tool_choice != "none":
            extra["tools"] = tools
            extra["response_prefix"] = tool_call_prefix(tool_choice, [tool["function"]["name"] for tool in tools])
        if response_format is not None:  # JSON output: written without guidance, opened by the prefix
            schema = response_format.get("json_schema", {}).get("schema")
            rule = "Respond only with one JSON object" + (
                f" that follows this JSON schema: {json.dumps(schema)}" if schema else "."
            )
            chat = [{"role": "system", "content": rule}, *chat]
            extra.update(guidance=False, response_prefix="{")
        return self.lc_request(chat, stop, options, **extra)

    def _message(self, engine: CLIPerEngine, request: GenerationRequest, result: GenerationResult) -> AIMessage:
        text = request.response_prefix + result.text
        metadata = self.result_metadata(engine, result)
        if not request.tools:
            return AIMessage(content=text, usage_metadata=_usage(result), response_metadata=metadata)
        parsed = parse_tool_calls(text)
        return AIMessage(
            content=parsed.content,
            tool_calls=[
                {"name": c["name"], "args": c["arguments"], "id": c["id"], "type": "tool_call"} for c in parsed.calls
            ],
            invalid_tool_calls=[
                {
                    "name": c["name"],
                    "args": c["arguments"],
                    "id": c["id"],
                    "error": c["error"],
                    "type": "invalid_tool_call",
                }
                for c in parsed.invalid
            ],
            usage_metadata=_usage(result),
            response_metadata=metadata,
        )

    def _final_chunk(
        self, engine: CLIPerEngine, request: GenerationRequest, result: GenerationResult
    ) -> ChatGenerationChunk:
        """The closing chunk: usage, metadata, and (for tool turns) the parsed tool calls."""
        message = self._message(engine, request, result)
        chunks = [
            {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i, "type": "tool_call_chunk"}
            for i, c in enumerate(message.tool_calls)
        ]
        content = message.content if request.tools else ""
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=content,
                tool_call_chunks=chunks,
                usage_metadata=message.usage_metadata,
                response_metadata=message.response_metadata,
                chunk_position="last",
            )
        )

    # --- the protocol ----------------------------------------------------------------------------

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """LangChain's ``batch`` (one ``invoke`` per input in a thread pool), with as many inputs in flight as the
        engine batches (``in_flight``)."""
        configs = self.in_flight(get_config_list(config, len(inputs)), kwargs)
        return super().batch(inputs, configs, return_exceptions=return_exceptions, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
            return ChatResult(generations=[_merge(chunks)])
        engine, request = self._chat_request(messages, stop, kwargs)
        result = engine.generate(request)
        return ChatResult(generations=[ChatGeneration(message=self._message(engine, request, result))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = [chunk async for chunk in self._astream(messages, stop, run_manager, **kwargs)]
            return ChatResult(generations=[_merge(chunks)])
        engine, request = self._chat_request(messages, stop, kwargs)
        result = await engine.agenerate(request)
        return ChatResult(generations=[ChatGeneration(message=self._message(engine, request, result))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, request = self._chat_request(messages, stop, kwargs)
        if request.tools:  # tool calls are parsed from the whole text, so a tool turn arrives at once
            yield self._final_chunk(engine, request, engine.generate(request))
            return
        stream = engine.stream(request)
        for delta in _with_prefix(request.response_prefix, stream):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._final_chunk(engine, request, stream.result)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine, request = self._chat_request(messages, stop, kwargs)
        if request.tools:
            yield self._final_chunk(engine, request, await engine.agenerate(request))
            return
        stream = engine.stream(request)
        if request.response_prefix:
            yield ChatGenerationChunk(message=AIMessageChunk(content=request.response_prefix))
        async for delta in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager:
                await run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
        yield self._final_chunk(engine, request, stream.result)

    # --- tools and structured output -------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Offer tools through the model's chat template; ``tool_choice`` "any"/"required" or a tool's
        name forces a call. A template that cannot render tools raises ``ToolsNotSupportedError``."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            tool_call_prefix(
                tool_choice, [tool["function"]["name"] for tool in formatted]
            )  # refuse a name that is not bound, now
            kwargs["tool_choice"] = tool_choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_mode", "json_schema"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output by a forced tool call (``function_calling``) or by JSON output
        (``json_schema``, ``json_mode``); either way written with guidance off, so strong weights
        cannot break the JSON."""
        if kwargs:
            raise InvalidRequestError(f"Unsupported keyword arguments: {', '.join(sorted(kwargs))}")
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools(
                [schema],
                tool_choice=name,
                ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": tool},
            )
            parser: Runnable = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_model
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            response_format: dict[str, Any] = {"type": "json_object"}
            if method == "json_schema":
                response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            llm = self.bind(
                response_format=response_format,
                ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": schema},
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        else:
            raise InvalidRequestError(f"Unknown structured output method {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _with_prefix(prefix: str, deltas: Iterator[str]) -> Iterator[str]:
    if prefix:
        yield prefix
    yield from deltas


def _merge(chunks: list[ChatGenerationChunk]) -> ChatGeneration:
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    return ChatGeneration(message=merged.message, generation_info=merged.generation_info)
