"""A burst of 300 concurrent streams against one server: every stream completes with the right
text, first tokens come in arrival order within a bound set by the queue, and a second
identical burst leaves the server's memory where the first one did."""

from __future__ import annotations

import asyncio
import gc

import httpx

from tests.reliability.harness import (
    PAGE_SIZE,
    PacedRunner,
    TextTokenizer,
    client,
    completion_body,
    expected_text,
    gather_bounded,
    make_engine,
    pages_in_use,
    rss_bytes,
    serve,
    stream_request,
)

NUM_STREAMS = 300
MAX_TOKENS = 12
BATCH = 32
RSS_SLACK_BYTES = 32 << 20  # generous: allocator noise, httpx pools, uvicorn buffers


def prompts() -> list[str]:
    return [f"burst {i:03d} " + "x" * (i % 7) for i in range(NUM_STREAMS)]


async def wave(url: str) -> list:
    async with client(url) as c:
        bodies = [completion_body(p, MAX_TOKENS, seed=i) for i, p in enumerate(prompts())]
        return await gather_bounded([stream_request(c, b) for b in bodies], timeout_s=60)


def test_300_concurrent_streams_complete_in_fcfs_order_without_growing() -> None:
    tokenizer = TextTokenizer()
    runner = PacedRunner(num_pages=2048, page_size=PAGE_SIZE, step_s=0.002)
    engine = make_engine(
        runner, policy="fcfs-chunked", max_batch_size=BATCH, prefill_token_budget=256
    )
    rss = []
    with serve(engine) as live:
        for _ in range(2):
            first_step = engine.engine.num_steps
            arrivals_before = len(engine.engine.seen)
            results = asyncio.run(wave(live.url))
            assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
            for prompt, r in zip(prompts(), results, strict=True):
                assert r.text == expected_text(tokenizer, prompt, MAX_TOKENS)
                assert r.finish_reason == "length"
                assert r.first_token_s is not None and r.first_token_s <= r.end_s
            # Arrival order as the engine saw it, and the step of each first token.
            probe = engine.engine
            arrived = list(probe.seen)[arrivals_before:]
            assert len(arrived) == NUM_STREAMS
            steps = [probe.first_token_step[rid] - first_step for rid in arrived]
            assert steps == sorted(steps), "a later arrival got its first token first"
            # Request k waits for at most k // BATCH generations of MAX_TOKENS steps (plus
            # prefill steps), doubled for slack: the queue, not luck, bounds its TTFT.
            for k, step in enumerate(steps):
                assert step <= 2 * (k // BATCH + 1) * (MAX_TOKENS + 2), (k, step)
            assert probe.kv.stats.num_preemptions == 0
            assert pages_in_use(engine) == (0, 0)
            health = httpx.get(f"{live.url}/health?deep=1", timeout=10)
            assert health.status_code == 200, health.text
            gc.collect()
            rss.append(rss_bytes())
    growth = rss[1] - rss[0]
    assert growth < RSS_SLACK_BYTES, f"RSS grew {growth / 2**20:.1f} MiB in the second wave"
