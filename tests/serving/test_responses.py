"""Response builders details that the HTTP tests do not show."""

from __future__ import annotations

import json

from serving import responses
from tfjax.api import Delta


def test_sse_event_keeps_unicode() -> None:
    assert responses.sse_event({"text": "é"}) == 'data: {"text": "é"}\n\n'.encode()


def test_sse_event_escapes_what_line_splitters_take_for_line_ends() -> None:
    text = "a\x85b\u2028c\u2029d\ne"
    event = responses.sse_event({"text": text}).decode()
    lines = event.splitlines()  # httpx's aiter_lines splits as str.splitlines does
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: ") :]) == {"text": text}


def test_usage_counts_the_prompt_once_over_choices() -> None:
    finals = [Delta("", (), 5, n, num_cached_tokens=4 if n == 2 else 0) for n in (2, 3)]
    assert responses.usage(finals) == {
        "prompt_tokens": 5,
        "completion_tokens": 5,
        "total_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
