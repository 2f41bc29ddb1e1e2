"""Turn chat messages into the model's prompt with its chat template, never dropping a message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from cliper_integrations.core.errors import EmptyPromptError
from cliper_integrations.core.preferences import preference_request

Message = Mapping[str, Any]


def message_dicts(prompt: str | Sequence[Message]) -> list[dict[str, Any]]:
    """A plain prompt as one user message, or copies of chat messages."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def as_messages(prompt: str | Sequence[Message]) -> list[dict[str, Any]]:
    """Accept a plain prompt or chat messages; refuse an empty prompt."""
    messages = message_dicts(prompt)
    if not messages or not any(str(m.get("content") or "").strip() or m.get("tool_calls") for m in messages):
        raise EmptyPromptError("The prompt is empty")
    return messages


def instruction_text(record: Mapping[str, Any]) -> str:
    """The user turn for a record with ``prompt``, or an Alpaca-style ``instruction`` plus optional ``input``."""
    if record.get("prompt"):
        return str(record["prompt"])
    if not record.get("instruction"):
        raise EmptyPromptError("A record needs 'prompt' or 'instruction'")
    extra = str(record.get("input") or "").strip()
    return f"{str(record['instruction']).strip()}\n\n{extra}" if extra else str(record["instruction"]).strip()


def with_preference_request(messages: list[dict[str, Any]], weights: Mapping[str, float]) -> list[dict[str, Any]]:
    """Write the active preferences in plain words at the end of the last user message."""
    request = preference_request(weights)
    if not request:
        return messages
    messages = [dict(m) for m in messages]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = f"{message.get('content') or ''}\n\n{request}".strip()
            return messages
    return [*messages, {"role": "user", "content": request}]


def fold_system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For templates without a system role: prepend system text to the next user message."""
    folded: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message.get("role") == "system":
            pending.append(str(message.get("content") or ""))
            continue
        if pending and message.get("role") == "user":
            message = {**message, "content": "\n\n".join([*pending, str(message.get("content") or "")])}
            pending = []
        folded.append(message)
    if pending:
        folded.append({"role": "user", "content": "\n\n".join(pending)})
    return folded


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Render messages with the tokenizer's chat template, ready for the assistant's turn.

    A template that rejects system messages gets them folded into the following user message; a
    tokenizer without any template gets a plain ``role: content`` transcript.
    """
    if tokenizer.chat_template is None:
        if tools:
            raise TemplateError("This model has no chat template, so it cannot be given tools")
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        return "\n".join([*lines, "assistant:"])
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
    if tools:
        kwargs["tools"] = list(tools)
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError:
        if not any(m.get("role") == "system" for m in messages):
            raise
        return tokenizer.apply_chat_template(fold_system_messages(messages), **kwargs)


def question_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """The token ids of ``question`` as one user turn through the chat template, ready for the answer."""
    return tokenizer(render_chat(tokenizer, [{"role": "user", "content": question}]), add_special_tokens=False)[
        "input_ids"
    ]


def tool_results_as_question(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Restate the trailing tool results as a user turn asking for a plain answer (for small models that
    keep calling tools once they see a tool response)."""
    end = len(messages)
    while end and messages[end - 1].get("role") == "tool":
        end -= 1
    results = "\n".join(str(m.get("content") or "") for m in messages[end:])
    start = end
    while start and messages[start - 1].get("role") == "assistant" and messages[start - 1].get("tool_calls"):
        start -= 1  # the call itself: seeing it, small models write another call
    question = next((m.get("content") for m in reversed(messages[:start]) if m.get("role") == "user"), "")
    restated = f"Tool results:\n{results}\n\nUsing these results, answer in words: {question}"
    return [*messages[:start], {"role": "user", "content": restated}]
