"""A full waiting queue answers extra requests with 429 at once, streaming or not, chat or
completions; the requests it holds complete once the engine catches up, and nobody hangs."""

from __future__ import annotations

import asyncio

from tests.reliability.harness import (
    PAGE_SIZE,
    GatedRunner,
    PacedRunner,
    TextTokenizer,
    client,
    completion_body,
    expected_text,
    gather_bounded,
    make_engine,
    serve,
    stream_request,
    wait_until,
)

MAX_WAITING = 8


def chat_body(text: str, stream: bool) -> dict:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        "stream": stream,
    }


def test_full_queue_rejects_at_once_while_the_engine_is_stuck_mid_step() -> None:
    tokenizer = TextTokenizer()
    runner = GatedRunner(num_pages=256, page_size=PAGE_SIZE)
    engine = make_engine(runner, max_waiting=MAX_WAITING)

    async def scenario(url: str) -> tuple[list, list]:
        async with client(url, timeout_s=30) as c:
            first = asyncio.create_task(stream_request(c, completion_body("held 0", 6)))
            assert await asyncio.to_thread(runner.entered.wait, 10)  # engine blocked in a step
            held = [
                asyncio.create_task(stream_request(c, completion_body(f"held {i}", 6)))
                for i in range(1, MAX_WAITING + 1)
            ]
            for _ in range(1000):  # the held requests reach the engine's inbox
                if len(engine._inbox) >= MAX_WAITING:
                    break
                await asyncio.sleep(0.01)
            assert len(engine._inbox) == MAX_WAITING
            extra = [
                stream_request(c, completion_body(f"extra {i}", 6, stream=i % 2 == 0))
                for i in range(10)
            ] + [
                stream_request(c, chat_body(f"chat {i}", i % 2 == 0), path="/v1/chat/completions")
                for i in range(10)
            ]
            rejected = await gather_bounded(extra, timeout_s=10)
            runner.gate.set()
            return await gather_bounded([first, *held], timeout_s=20), rejected

    with serve(engine) as live:
        accepted, rejected = asyncio.run(scenario(live.url))
    for r in rejected:
        # The engine stays blocked until these returned: a 429 never waits for a step.
        assert r.status == 429 and r.error["code"] == "queue_full", r
    for i, r in enumerate(accepted):
        assert r.ok and r.text == expected_text(tokenizer, f"held {i}", 6), r


def test_burst_beyond_the_queue_gets_429s_and_completions_only() -> None:
    tokenizer = TextTokenizer()
    runner = PacedRunner(num_pages=512, page_size=PAGE_SIZE, step_s=0.004)
    engine = make_engine(runner, max_batch_size=8, max_waiting=20)

    async def burst(url: str) -> list:
        async with client(url, timeout_s=30) as c:
            calls = [stream_request(c, completion_body(f"burst {i}", 24)) for i in range(150)]
            return await gather_bounded(calls, timeout_s=40)

    with serve(engine) as live:
        results = asyncio.run(burst(live.url))
        wait_until(lambda: engine.stats().device_pages_used == 0, 5, "pages to return")
    rejected = [r for r in results if r.status == 429]
    served = [(i, r) for i, r in enumerate(results) if r.status != 429]
    assert rejected and served, (len(rejected), len(served))
    for r in rejected:
        assert r.error["code"] == "queue_full", r
    for i, r in served:
        assert r.ok and r.text == expected_text(tokenizer, f"burst {i}", 24), r
