"""A request's prompt as token ids: completions' text or ids, chat messages (and tools) through
the model's chat template.

The template is the model's Jinja code and may reject any conversation (a role order it does
not allow, a missing field): its error becomes a 400 naming `messages`. Tools are passed to the
template as transformers does (`tools=[...]`), and only to a template that renders them
(`serving.tools.supports_tools`); asking any other model for tools is a 400.
"""

from __future__ import annotations

from typing import Any, Protocol

from serving.errors import bad_request
from serving.tools import ToolRequest, supports_tools


class Tokenizer(Protocol):
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str: ...


def completion_prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    return tokenizer.encode(prompt) if isinstance(prompt, str) else prompt


def chat_prompt_ids(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: ToolRequest | None
) -> list[int]:
    if tools is not None and not supports_tools(getattr(tokenizer, "chat_template", None)):
        raise bad_request("This model's chat template does not take tools.", param="tools")
    kwargs = {} if tools is None else {"tools": list(tools.tools)}
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    except Exception as err:  # the model's Jinja template may reject any conversation
        raise bad_request(f"The chat template rejected the messages: {err}", "messages") from None
    return tokenizer.encode(text)
