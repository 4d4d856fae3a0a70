"""Response builders details that the HTTP tests do not show."""

from __future__ import annotations

from serving import responses
from tfjax.api import Delta


def test_sse_event_keeps_unicode() -> None:
    assert responses.sse_event({"text": "é"}) == 'data: {"text": "é"}\n\n'.encode()


def test_usage_counts_the_prompt_once_over_choices() -> None:
    finals = [Delta("", (), 5, n, num_cached_tokens=4 if n == 2 else 0) for n in (2, 3)]
    assert responses.usage(finals) == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
