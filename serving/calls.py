"""One admitted generation request as the app tracks it, and how its deltas become chunks.

A `Call` is one engine request (one choice) from submit to its last delta; `Choices` are the
`n` calls answering one HTTP request. The functions here turn a call's text into OpenAI chunks
and a finished call into its finish reason or its error; `serving.app` decides when.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving import responses
from serving.errors import SERVER_ERROR, APIError, from_final_delta
from serving.tools import ToolCallStream
from tfjax.api import Delta, RequestStream
from tfjax.request import FinishReason

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


@dataclass(slots=True)
class Call:
    """One admitted generation request, from submit to its last delta."""

    header: responses.StreamHeader
    chat: bool
    sse: bool  # stream the answer as server-sent events
    include_usage: bool
    logprobs: bool  # the request asked for logprobs
    source: RequestStream
    submit_s: float  # time.monotonic()
    num_prompt_tokens: int
    num_output_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    final: Delta | None = None  # the delta with finish_reason (or error); None if cut short
    text_offset: int = 0  # completions logprobs: characters of token text already sent
    index: int = 0  # the choice this call answers
    tool_calls: ToolCallStream | None = None  # chat with tools: splits calls from the content


@dataclass(slots=True)
class Choices:
    """The `n` calls answering one request, choice i in `calls[i]`. Only choice 0 is submitted
    at admission; the others when its first delta shows its prompt prefilled, so that they
    find the prompt's full pages in the prefix cache rather than prefill it again. With
    `best_of`, `n` sequences run and the `keep` likeliest are answered."""

    calls: list[Call]
    n: int  # sequences generated
    submit: Callable[[int], Call]  # submits choice i (raises `EngineError`)
    keep: int  # choices answered: `n`, or fewer with best_of
    error: str | None = None  # why a later choice could not be submitted


def text_chunk(
    call: Call,
    text: str,
    finish_reason: str | None,
    tokens: list[responses.TokenText] | None = None,
) -> dict[str, Any]:
    """A completions chunk, or a chat chunk whose delta is `text` (empty: `{}`), with the
    logprobs of `tokens` if the request asked for them."""
    if call.chat:
        delta = {"content": text} if text or tokens is not None else {}
        logprobs = None if tokens is None else responses.chat_logprobs(tokens)
        return responses.chat_chunk(call.header, delta, finish_reason, logprobs, call.index)
    logprobs = None if tokens is None else responses.completion_logprobs(tokens, call.text_offset)
    call.text_offset += sum(len(t.text) for t in tokens or ())
    return responses.completion_chunk(call.header, text, finish_reason, logprobs, call.index)


def finish_name(call: Call, num_tool_calls: int = 0) -> str:
    """OpenAI's finish reason of a call that ended with stop or length: "tool_calls" for an
    answer that stopped after calling tools."""
    reason = FINISH_REASONS[call.final.finish_reason]
    return "tool_calls" if num_tool_calls and reason == "stop" else reason


def is_healthy(delta: Delta) -> bool:
    """The delta is output, or a stop/length finish: not an error or an abort."""
    return delta.error is None and delta.finish_reason in (None, *FINISH_REASONS)


def choices_failure(choices: Choices) -> APIError | None:
    """The first failed choice's error (`from_final_delta`), or why one was never queued."""
    for call in choices.calls:
        failure = from_final_delta(call.final)
        if failure is not None:
            return failure
    if len(choices.calls) < choices.n:
        message = choices.error or "The first choice ended before the others were queued."
        return APIError(503, message, type=SERVER_ERROR)
    return None
