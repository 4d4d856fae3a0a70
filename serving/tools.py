"""OpenAI tools on chat: `tools`, `tool_choice` and `parallel_tool_calls` in, `tool_calls` out.

The tools are rendered by the model's own chat template (`tools=` as transformers passes them),
so only models whose template mentions `tools` take them (else 400). The model answers in the
Hermes format Qwen2.5 and others are trained on, which vLLM's `hermes` parser reads too:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

`tool_choice`: "none" renders no tools and parses nothing; "auto" (the default with tools)
lets the model choose and parses any blocks it writes; "required" or a named function
constrains the output with a grammar (`serving.constraints`, kind "lark") to one or more such
blocks whose JSON validates against the functions' `parameters` (one block when
`parallel_tool_calls` is false). A block that does not parse as a call stays in the content, as
vLLM does. `ToolCallStream` splits streamed text into content and finished calls, holding back
text that may start a block; a non-streamed answer runs through the same splitter.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from serving.constraints import Constraint
from serving.errors import bad_request

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_ANY_OBJECT = {"type": "object"}
MAX_TOOLS = 128  # OpenAI's limit


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The validated tools of a chat request that may call them."""

    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, as the chat template takes them
    choice: str  # "auto", "required" or the name of the one function to call
    parallel: bool  # more than one call per answer allowed

    def constraint(self) -> Constraint | None:
        """The grammar that forces a call ("required" or a named function), else None."""
        if self.choice == "auto":
            return None
        functions = [
            t["function"]
            for t in self.tools
            if self.choice == "required" or t["function"]["name"] == self.choice
        ]
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f["name"]},
                    "arguments": f.get("parameters") or _ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ]
        schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
        more = ' ("\\n" call)*' if self.parallel else ""
        lark = (
            f"start: call{more}\n"
            f"call: {json.dumps(CALL_START + chr(10))} body {json.dumps(chr(10) + CALL_END)}\n"
            f"body: %json {json.dumps(schema)}"
        )
        return Constraint("lark", lark, "tool_choice")


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools, or None when it has none or `tool_choice` is "none"."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"'tools' must be a list of at most {MAX_TOOLS} tools.", param="tools")
    functions = [_parse_tool(t) for t in tools]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise bad_request("Tool function names must be unique.", param="tools")
    if isinstance(choice, dict):
        choice = _named_choice(choice, names)
    elif choice is None:
        choice = "auto"
    elif choice not in ("none", "auto", "required"):
        raise bad_request(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    if choice == "none":
        return None
    tools = tuple({"type": "function", "function": f} for f in functions)
    return ToolRequest(tools, choice, parallel is not False)


def _parse_tool(tool: object) -> dict[str, Any]:
    """The tool's `function`, checked: name, optional description and parameters."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise bad_request(
            'Each tool must be {"type": "function", "function": {...}}.', param="tools"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad_request(
            "Each tool function needs a 'name' of 1-64 letters, digits, '_' or '-'.", "tools"
        )
    if function.get("description") is not None and not isinstance(function["description"], str):
        raise bad_request("A tool function's 'description' must be a string.", param="tools")
    if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
        raise bad_request("A tool function's 'parameters' must be a JSON schema.", "tools")
    keys = ("name", "description", "parameters", "strict")
    return {k: function[k] for k in keys if function.get(k) is not None}


def _named_choice(choice: dict[str, Any], names: list[str]) -> str:
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if choice.get("type") != "function" or name not in names:
        raise bad_request(
            "'tool_choice' must name one of the request's tools: "
            '{"type": "function", "function": {"name": ...}}.',
            param="tool_choice",
        )
    return name


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's `tool_calls` as chat templates expect them: `arguments` as an
    object (OpenAI sends a JSON string; templates apply `tojson` to it)."""
    calls = []
    for call in message.get("tool_calls") or ():
        arguments = call["function"]["arguments"]
        with contextlib.suppress(ValueError):  # not JSON: the template gets the string as sent
            arguments = json.loads(arguments)
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls} if calls else message


def supports_tools(chat_template: str | None) -> bool:
    """The template renders a `tools` variable (transformers' convention)."""
    return bool(chat_template) and "tools" in chat_template


@dataclass(slots=True)
class ToolCallStream:
    """Splits a chat answer, pushed in pieces, into content and tool calls (OpenAI's objects,
    with `index` for streaming)."""

    num_calls: int = 0
    _pending: str = ""  # a block not yet closed, text that may start one, or held whitespace

    def push(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The content and the calls completed by `text`, content first. Whitespace after a
        call is the format's, not content: it is held until text follows it (then sent) or a
        block or the end does (then dropped), so any split of an answer gives the same."""
        self._pending += text
        content, calls = [], []
        while True:
            if self._pending.startswith(CALL_START):
                end = self._pending.find(CALL_END)
                if end < 0:
                    break
                block = self._pending[: end + len(CALL_END)]
                self._pending = self._pending[end + len(CALL_END) :]
                call = self._call(block[len(CALL_START) : -len(CALL_END)])
                if call is None:
                    content.append(block)
                else:
                    calls.append(call)
                continue
            start = self._pending.find(CALL_START)
            if start >= 0:
                piece, self._pending = self._pending[:start], self._pending[start:]
                content.append("" if self._is_padding(piece) else piece)
                continue
            cut = len(self._pending) - _partial_start(self._pending)
            if not self._is_padding(self._pending[:cut]):
                content.append(self._pending[:cut])
                self._pending = self._pending[cut:]
            break
        return "".join(content), calls

    def flush(self) -> str:
        """The text still held back (an unfinished block stays content)."""
        rest, self._pending = self._pending, ""
        return "" if self._is_padding(rest) else rest

    def _is_padding(self, text: str) -> bool:
        return self.num_calls > 0 and not text.strip()

    def _call(self, block: str) -> dict[str, Any] | None:
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and isinstance(value.get("arguments", {}), dict | str)
        ):
            return None
        arguments = value.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = {
            "index": self.num_calls,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": value["name"], "arguments": arguments},
        }
        self.num_calls += 1
        return call


def split_answer(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer's content (None if only calls) and its tool calls, without `index`."""
    stream = ToolCallStream()
    content, calls = stream.push(text)
    if not calls:
        return text, []
    content = (content + stream.flush()).strip()
    calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return content or None, calls


def _partial_start(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of CALL_START."""
    for n in range(min(len(text), len(CALL_START) - 1), 0, -1):
        if CALL_START.startswith(text[-n:]):
            return n
    return 0
