"""Faults inside the engine: a step that raises once, a runner that always raises, requests
queued at the moment the engine thread gives up, and an invariant check abandoned by its
caller. Whatever happens, every client gets an answer (tokens, an error event, or 503) within
a bound, and /health tells the truth."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.reliability.harness import (
    PAGE_SIZE,
    FaultyRunner,
    GatedRunner,
    LiveServer,
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
from tfjax.async_engine import MAX_CONSECUTIVE_FAILURES
from tfjax.request import SamplingParams


def health(url: str, deep: bool = False) -> httpx.Response:
    return httpx.get(f"{url}/health" + ("?deep=1" if deep else ""), timeout=15)


def test_one_failed_step_ends_its_requests_with_an_error_and_the_engine_recovers() -> None:
    tokenizer = TextTokenizer()
    runner = FaultyRunner(num_pages=512, page_size=PAGE_SIZE, fail_at=5, step_s=0.002)
    engine = make_engine(runner)

    async def scenario(url: str) -> tuple[list, object]:
        async with client(url, timeout_s=20) as c:
            bodies = [completion_body(f"victim {i}", 20) for i in range(8)]
            hit = await gather_bounded([stream_request(c, b) for b in bodies], 20)
            after = await stream_request(c, completion_body("survivor", 20))
            return hit, after

    with serve(engine) as live:
        hit, after = asyncio.run(scenario(live.url))
        assert all(r.done for r in hit), "every stream ends with [DONE]"
        failed = [r for r in hit if r.error is not None]
        assert failed, "the injected fault hit no request"
        for r in failed:
            assert r.error["type"] == "server_error" and "injected" in r.error["message"]
        for i, r in enumerate(hit):
            if r.error is None:
                assert r.text == expected_text(tokenizer, f"victim {i}", 20)
        assert after.ok and after.text == expected_text(tokenizer, "survivor", 20)
        assert engine.is_healthy
        assert health(live.url, deep=True).status_code == 200
        stats = engine.stats()
        assert (stats.device_pages_used, stats.host_pages_used) == (0, 0)


def test_a_runner_that_always_fails_turns_the_server_unhealthy() -> None:
    """Failing steps count as consecutive even with idle time and health checks between them:
    a server whose every step fails must say so on /health, not stay 'ok' and fail every
    request while a load balancer polls it."""
    engine = make_engine(FaultyRunner(num_pages=64, page_size=PAGE_SIZE, always=True))

    async def one(url: str, stream: bool) -> object:
        async with client(url, timeout_s=10) as c:
            body = completion_body("doomed", 8, stream=stream)
            return await asyncio.wait_for(stream_request(c, body), 10)

    with serve(engine) as live:
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            assert health(live.url, deep=True).status_code == 200
            r = asyncio.run(one(live.url, stream=True))
            assert r.done and r.error is not None and r.error["type"] == "server_error"
        wait_until(lambda: not engine.is_healthy, 5, "the engine to give up")
        assert health(live.url).status_code == 503
        assert health(live.url, deep=True).status_code == 503
        for stream in (True, False):
            r = asyncio.run(one(live.url, stream=stream))
            assert r.status == 503 and r.error["code"] == "engine_unavailable", r


def test_requests_queued_when_the_engine_gives_up_end_with_an_error() -> None:
    """The last failing step is held while more requests queue up behind it: when the engine
    thread stops, they must end with an error event instead of waiting forever."""
    runner = GatedRunner(num_pages=64, page_size=PAGE_SIZE, always=True)
    runner.gate.set()
    engine = make_engine(runner)

    async def scenario(live: LiveServer) -> list:
        async with client(live.url, timeout_s=20) as c:
            for _ in range(MAX_CONSECUTIVE_FAILURES - 1):
                r = await stream_request(c, completion_body("warm-up failure", 4))
                assert r.error is not None
            runner.gate.clear()
            runner.entered.clear()
            last = asyncio.create_task(stream_request(c, completion_body("last", 4)))
            assert await asyncio.to_thread(runner.entered.wait, 10)
            queued = [
                asyncio.create_task(stream_request(c, completion_body(f"queued {i}", 4)))
                for i in range(5)
            ]
            while len(live.app_server._live) < 6:  # all five submitted: sitting in the inbox
                await asyncio.sleep(0.01)
            runner.gate.set()
            return await gather_bounded([last, *queued], timeout_s=15)

    with serve(engine) as live:
        results = asyncio.run(scenario(live))
        assert not engine.is_healthy
        for r in results:
            assert r.done and r.error is not None, r
        assert health(live.url).status_code == 503


def test_an_abandoned_invariant_check_does_not_kill_the_engine() -> None:
    """A caller that stops waiting for `check_invariants` (a timeout, a cancelled /health
    handler) must not leave the engine thread to trip over the cancelled future."""
    runner = GatedRunner(num_pages=64, page_size=PAGE_SIZE)
    engine = make_engine(runner)

    async def scenario() -> None:
        stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
        assert await asyncio.to_thread(runner.entered.wait, 10)  # the engine is mid-step
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(engine.check_invariants(), 0.05)
        runner.gate.set()
        deltas = [d async for d in stream]
        assert deltas[-1].finish_reason is not None and deltas[-1].error is None
        assert await asyncio.wait_for(engine.check_invariants(), 10) is None

    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
        assert engine.is_healthy
    finally:
        engine.shutdown()
