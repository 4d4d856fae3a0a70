"""The prefix cache through the server: a repeated system prompt is reported as cached in the
OpenAI usage object and in Prometheus, the text is what a cold run gives, and every page
comes back once the requests end (cached pages are evictable, not in use)."""

from __future__ import annotations

import httpx

from tests.reliability.harness import (
    PAGE_SIZE,
    TextTokenizer,
    completion_body,
    expected_text,
    make_engine,
    serve,
    wait_until,
)

SYSTEM = "You are a terse assistant. Answer in one word. " * 2  # 94 tokens, one per character


def test_repeated_prefix_is_reported_cached_and_outputs_match_a_cold_run() -> None:
    tokenizer = TextTokenizer()
    engine = make_engine(policy="fcfs-chunked", host_pages=None)
    with serve(engine) as live:
        usages = []
        for question in ("first?", "second?"):
            body = completion_body(SYSTEM + question, 6, stream=False)
            answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
            expected = expected_text(tokenizer, SYSTEM + question, 6)
            assert answer["choices"][0]["text"] == expected
            usages.append(answer["usage"])
        assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
        shared = len(SYSTEM) // PAGE_SIZE * PAGE_SIZE  # full pages of the system prompt
        assert usages[1]["prompt_tokens_details"] == {"cached_tokens": shared}
        metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert "tfjax_prefix_cache_queries_total 2.0" in metrics
        assert f'tfjax_prefix_cache_hit_tokens_total{{tier="device"}} {shared}.0' in metrics
        wait_until(lambda: engine.stats().device_pages_used == 0, 5, "pages to return")
        assert httpx.get(f"{live.url}/health?deep=1", timeout=15).status_code == 200


def test_later_choices_reuse_the_first_choices_prompt_pages() -> None:
    """`n=3`: one prefill of the prompt; choices 1 and 2 find its full pages cached."""
    tokenizer = TextTokenizer()
    engine = make_engine(policy="fcfs-chunked", host_pages=None)
    with serve(engine) as live:
        body = completion_body(SYSTEM, 6, stream=False, n=3)
        answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
        expected = expected_text(tokenizer, SYSTEM, 6)
        assert [c["text"] for c in answer["choices"]] == [expected] * 3
        assert answer["usage"]["completion_tokens"] == 18
        shared = len(SYSTEM) // PAGE_SIZE * PAGE_SIZE
        metrics = httpx.get(f"{live.url}/metrics", timeout=10).text
        assert f'tfjax_prefix_cache_hit_tokens_total{{tier="device"}} {2 * shared}.0' in metrics
        wait_until(lambda: engine.stats().device_pages_used == 0, 5, "pages to return")
