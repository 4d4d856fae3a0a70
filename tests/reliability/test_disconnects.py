"""A third of the clients of a burst hang up at random points (before any token, mid-stream,
one token before the end) while the TokenFlow policy preempts and resumes through the host
tier: each abort reaches the engine within one step of the server calling it, every device
and host page comes back, and the streams that stayed get exactly what a calm run gives."""

from __future__ import annotations

import asyncio
import random

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
    serve,
    stream_request,
    wait_until,
)
from tfjax.request import FinishReason
from tfjax.sched.registry import make_policy

NUM_STREAMS = 150
MAX_TOKENS = 24
ABORT_NOTICE_S = 5.0  # client hang-up -> server calls abort (generous: a loaded 2-core box)


def bodies() -> list[dict]:
    rng = random.Random(11)
    return [
        completion_body(
            f"client {i:03d} says " + "y" * rng.randrange(12),
            MAX_TOKENS,
            seed=1000 + i,
            temperature=0.8,
            consumption_rate=rng.choice([2.0, 4.0, 8.0]),
        )
        for i in range(NUM_STREAMS)
    ]


def hang_up_points() -> dict[int, int]:
    """Client index -> text events it reads before closing the connection."""
    rng = random.Random(5)
    leavers = rng.sample(range(NUM_STREAMS), NUM_STREAMS // 3)
    return {i: rng.randrange(MAX_TOKENS) for i in leavers}


async def storm(url: str) -> list:
    leave = hang_up_points()
    async with client(url) as c:
        calls = [
            stream_request(c, body, disconnect_after=leave.get(i))
            for i, body in enumerate(bodies())
        ]
        return await gather_bounded(calls, timeout_s=90)


async def calm(url: str, indices: list[int]) -> dict[int, str]:
    """The same requests again, four at a time."""
    limit = asyncio.Semaphore(4)
    all_bodies = bodies()

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, str]:
        async with limit:
            return i, (await stream_request(c, all_bodies[i])).text

    async with client(url) as c:
        return dict(await gather_bounded([one(c, i) for i in indices], timeout_s=60))


def pages_used(engine) -> tuple[int, int]:
    stats = engine.stats()  # the engine thread's snapshot, refreshed every loop
    return stats.device_pages_used, stats.host_pages_used


def test_a_third_of_clients_hang_up_mid_burst() -> None:
    tokenizer = TextTokenizer()
    runner = PacedRunner(num_pages=1024, page_size=PAGE_SIZE, step_s=0.002)
    # 160 device pages hold ~16 of these requests: the rest queue, and TokenFlow preempts.
    policy = make_policy("tokenflow", schedule_interval_s=0.02, hysteresis_s=0.2)
    engine = make_engine(runner, policy=policy, max_batch_size=16, num_pages=160, host_pages=512)
    probe = engine.engine
    with serve(engine) as live:
        results = asyncio.run(storm(live.url))
        leave = hang_up_points()
        wait_until(lambda: not probe.has_work, 20, "the engine to go idle")
        by_prompt = {tuple(r.prompt_ids): r for r in probe.seen.values()}
        stayed = []
        for i, (body, result) in enumerate(zip(bodies(), results, strict=True)):
            request = by_prompt[tuple(tokenizer.encode(body["prompt"]))]
            if i not in leave:
                assert result.ok, (i, result)
                assert request.finish_reason is FinishReason.LENGTH
                stayed.append(i)
                continue
            assert not result.done
            if request.finish_reason is FinishReason.LENGTH:
                continue  # it finished before the server saw the hang-up: nothing to abort
            assert request.finish_reason is FinishReason.ABORT, (i, request.finish_reason)
            rid = request.request_id
            called = engine.abort_called_at_step[rid]
            assert probe.aborted_at_step[rid] - called <= 1, "abort took more than one step"
            assert engine.abort_called_at_s[rid] - result.end_s < ABORT_NOTICE_S
            assert request.page_ids == []
        aborted = [r for r in probe.seen.values() if r.finish_reason is FinishReason.ABORT]
        assert len(aborted) >= len(leave) // 2, f"{len(aborted)} of {len(leave)} aborted"
        assert any(r.num_preemptions for r in aborted), "no hang-up hit a preempted request"
        wait_until(lambda: pages_used(engine) == (0, 0), 5, "device and host pages to return")
        health = httpx.get(f"{live.url}/health?deep=1", timeout=15)
        assert health.status_code == 200, health.text

        calm_run = asyncio.run(calm(live.url, stayed))
        for i in stayed:
            prompt = bodies()[i]["prompt"]
            assert results[i].text == calm_run[i] == expected_text(tokenizer, prompt, MAX_TOKENS)
