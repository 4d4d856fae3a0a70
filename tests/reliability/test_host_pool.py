"""The host KV pool runs out under a preemption storm: preemptions that find no host room
drop the KV and resume by recompute, no stream loses or repeats a token, and both page pools
balance afterwards. Once with a policy that preempts at random (so the fallback surely
happens) and once with TokenFlow itself under a burst. Prompts differ from their first
token on, so the prefix cache shares nothing and cannot relieve the pressure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.kv.test_offload import StormPolicy
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
from tfjax.sched.base import Policy
from tfjax.sched.registry import make_policy

NUM_STREAMS = 60
MAX_TOKENS = 20


def storm_policy() -> StormPolicy:
    return StormPolicy(seed=5, p_preempt=0.2, p_resume=0.5)


def tokenflow_policy() -> Policy:
    return make_policy("tokenflow", schedule_interval_s=0.02, hysteresis_s=0.2)


@pytest.mark.parametrize("policy", [storm_policy, tokenflow_policy], ids=["storm", "tokenflow"])
def test_host_pool_exhaustion_falls_back_to_recompute_and_loses_nothing(
    policy: Callable[[], Policy],
) -> None:
    tokenizer = TextTokenizer()
    runner = PacedRunner(num_pages=512, page_size=PAGE_SIZE, step_s=0.002)
    engine = make_engine(runner, policy=policy(), max_batch_size=16, num_pages=96, host_pages=8)

    async def burst(url: str) -> list:
        async with client(url, timeout_s=60) as c:
            calls = [
                stream_request(
                    c, completion_body(f"{i} pool", MAX_TOKENS, consumption_rate=1.0 + i % 2)
                )
                for i in range(NUM_STREAMS)
            ]
            return await gather_bounded(calls, timeout_s=60)

    with serve(engine) as live:
        results = asyncio.run(burst(live.url))
        for i, r in enumerate(results):
            assert r.ok and r.text == expected_text(tokenizer, f"{i} pool", MAX_TOKENS), r
        stats = engine.engine.kv.stats
        assert stats.num_host_full_fallbacks > 0
        wait_until(
            lambda: (engine.stats().device_pages_used, engine.stats().host_pages_used) == (0, 0),
            5,
            "pages to return",
        )
        assert httpx.get(f"{live.url}/health?deep=1", timeout=15).status_code == 200
