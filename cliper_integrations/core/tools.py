"""Tool calling through the model's own chat template, and parsing the calls back out of its text.

Models trained on the Hermes/Qwen convention answer a tool turn with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; guidance is suspended inside that span
so the classifier can never bend a function name or a JSON argument.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from cliper_integrations.core.errors import CLIPerError, InvalidRequestError

TOOL_CALL_SPAN = ("<tool_call>", "</tool_call>")
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# Small models sometimes answer a tool turn with a fenced JSON call instead of the template's markers.
_FENCED = re.compile(r"^\s*```(?:json)?\s*(\{.*\})\s*```\s*$", re.DOTALL)


class ToolsNotSupportedError(CLIPerError, ValueError):
    """The model's chat template cannot render tool schemas."""


@dataclass
class ParsedToolCalls:
    content: str
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments": dict}
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments": str, "error"}


def check_tools_supported(tokenizer: PreTrainedTokenizerBase) -> None:
    template = tokenizer.chat_template
    template = " ".join(template.values()) if isinstance(template, dict) else template or ""
    if "tools" not in template:
        raise ToolsNotSupportedError(
            "This model's chat template has no place for tools, so tool schemas cannot be rendered; "
            "use a model whose template supports tools (the embedded Qwen2.5 model does)."
        )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(payload: str) -> dict[str, Any]:
    data = json.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("a tool call needs a string 'name'")
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return {"id": new_call_id(), "name": data["name"], "arguments": arguments}


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Split generated text into plain content and tool calls (well-formed and malformed)."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        fenced = _FENCED.match(text)
        stripped = fenced.group(1) if fenced else text.strip()
        if stripped.startswith("{") and '"name"' in stripped:
            try:
                return ParsedToolCalls("", [_as_call(stripped)])
            except (ValueError, TypeError):
                pass
        return ParsedToolCalls(text)
    parsed = ParsedToolCalls(_BLOCK.sub("", text).strip())
    for block in blocks:
        try:
            parsed.calls.append(_as_call(block.group(1)))
        except (ValueError, TypeError) as error:
            name = re.search(r'"name"\s*:\s*"([^"]*)"', block.group(1))
            parsed.invalid.append(
                {
                    "id": new_call_id(),
                    "name": name.group(1) if name else None,
                    "arguments": block.group(1),
                    "error": str(error),
                }
            )
    return parsed


def tool_call_prefix(choice: Any, tool_names: list[str]) -> str:
    """The opening of the assistant's turn that forces a tool call (chat templates have no
    ``tool_choice``): up to the name for "any"/"required"/True, up to the arguments for a named tool,
    nothing for "auto"/"none"/None. (A bare ``<tool_call>`` is not enough: the 0.5B default model then
    often declines.)"""
    if choice in (None, "auto", False, "none"):
        return ""
    if choice in ("any", "required", True):  # the model only chooses which tool
        return f'{TOOL_CALL_SPAN[0]}\n{{"name": "'
    name = choice["function"]["name"] if isinstance(choice, dict) else choice
    if name not in tool_names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the bound tools")
    return f'{TOOL_CALL_SPAN[0]}\n{{"name": {json.dumps(name)}, "arguments": {{'
