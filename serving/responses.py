"""OpenAI response bodies and SSE chunks, as plain dicts in the shapes of the OpenAI API.

Builders only: `serving.app` decides which to send when, and `serving.protocol` parses what
comes in. Logprobs are rendered from `TokenText` (a token's logprob with the token and its
alternatives already decoded to text), in chat's `{"content": [...]}` shape or the legacy
completions shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tfjax.api import Delta

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The fields every chunk and response of one request repeats unchanged."""

    id: str
    created: int  # unix seconds
    model: str


def usage(finals: Sequence[Delta]) -> dict[str, Any]:
    """OpenAI's usage object over a request's choices (the prompt counted once), with the
    prompt tokens the prefix cache served the first."""
    completion_tokens = sum(f.num_output_tokens for f in finals)
    return {
        "prompt_tokens": finals[0].num_prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": finals[0].num_prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finals[0].num_cached_tokens},
    }


class TokenText(NamedTuple):
    """One output token's logprob with the token and its alternatives as text."""

    text: str
    logprob: float
    top: tuple[tuple[str, float], ...]  # likeliest first


def chat_logprobs(tokens: Sequence[TokenText]) -> dict[str, Any]:
    """A chat choice's `logprobs`: OpenAI's `{"content": [...], "refusal": null}`."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        {**entry(t.text, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]}
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[TokenText], text_offset: int = 0) -> dict[str, Any]:
    """A completions choice's legacy `logprobs`; `text_offset` is where the first token
    starts in the completion's text."""
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def completion_chunk(
    h: StreamHeader,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return _envelope(
        h, "text_completion", [completion_choice(index, text, finish_reason, logprobs)]
    )


def chat_chunk(
    h: StreamHeader,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(h, "chat.completion.chunk", [choice])


def usage_chunk(h: StreamHeader, object_name: str, usage: dict[str, Any]) -> dict[str, Any]:
    """The `stream_options.include_usage` chunk: no choices, sent just before [DONE]."""
    return _envelope(h, object_name, [], usage)


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(
    index: int,
    text: str | None,
    finish_reason: str,
    logprobs: dict[str, Any] | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def completion_response(
    h: StreamHeader, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return _envelope(h, "text_completion", choices, usage)


def chat_response(
    h: StreamHeader, choices: list[dict[str, Any]], usage: dict[str, Any]
) -> dict[str, Any]:
    return _envelope(h, "chat.completion", choices, usage)


# Characters that JSON may carry raw but that line splitters like Python's `str.splitlines`
# (and so httpx's `aiter_lines`) treat as line ends: escaped, a generated token that contains
# one cannot cut an event in two for such a client.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse_event(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)
    return b"data: " + text.encode() + b"\n\n"


def _envelope(
    h: StreamHeader,
    object_name: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": h.id,
        "object": object_name,
        "created": h.created,
        "model": h.model,
        "choices": choices,
        "usage": usage,
    }
