"""`tfjax serve` on a tiny real checkpoint in a subprocess: the hostile-body sweep and a short
random fuzz against the real tokenizer and sampler (which the fake runner does not exercise),
then SIGTERM in the middle of a burst: exit code 0 in bounded time, and every stream ends with
[DONE] (finished, or cut by the shutdown with an error event first).

Slow: the server compiles its step buckets at start (~20 s on 2 cores).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability.harness import (
    MODEL,
    client,
    completion_body,
    gather_bounded,
    serve_subprocess,
    stream_request,
)
from tests.reliability.test_fuzz import FUZZ_SETTINGS, PATHS, bodies, check_answer, post, sweep

pytestmark = pytest.mark.slow

GRACE_S = 1.0
NUM_STREAMS = 64  # the long half holds 3,200 tokens: seconds of decoding at batch 2
EXIT_WITHIN_S = 30.0  # grace + uvicorn's backstop (10 s) + engine shutdown, with slack


@pytest.fixture(scope="module")
def server(
    tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, str]]:
    args = [
        "--model", str(tiny_llama3_dir), "--served-model-name", MODEL, "--policy", "tokenflow",
        "--max-batch-size", "2", "--max-model-len", "128", "--kv-pages", "96",
        "--prefill-token-budget", "64", "--max-waiting", "256",
        "--shutdown-grace-s", str(GRACE_S), "--log-level", "warning",
    ]  # fmt: skip
    cache = tmp_path_factory.mktemp("cache")
    with serve_subprocess(args, cache, cache / "serve.log") as running:
        yield running


@pytest.fixture(scope="module")
def http(server: tuple[subprocess.Popen, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[1], timeout=30) as c:
        yield c


def test_edge_value_sweep_on_the_real_model(http: httpx.Client) -> None:
    failures = sweep(http)
    assert not failures, "\n".join(failures[:30])
    assert http.get("/health?deep=1").status_code == 200


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(path=st.sampled_from(PATHS), body=bodies)
def test_random_bodies_on_the_real_model(http: httpx.Client, path: str, body: bytes) -> None:
    check_answer(post(http, path, body))
    assert http.get("/health").status_code == 200


async def generated_tokens(c: httpx.AsyncClient) -> float:
    match = re.search(r"^tfjax_generated_tokens_total (\S+)$", (await c.get("/metrics")).text, re.M)
    return float(match.group(1)) if match else 0.0


def test_sigterm_mid_burst_exits_zero_and_ends_every_stream(
    server: tuple[subprocess.Popen, str], http: httpx.Client
) -> None:
    proc, url = server
    assert http.get("/health?deep=1").status_code == 200

    async def burst() -> tuple[list, list]:
        async with client(url, timeout_s=EXIT_WITHIN_S) as c:
            bodies = [  # short ones finish within the grace period, long ones cannot
                completion_body(f"the quick brown fox {i}", 100 if i % 2 else 6)
                for i in range(NUM_STREAMS)
            ]
            streams = [asyncio.create_task(stream_request(c, b)) for b in bodies]
            for _ in range(200):  # until tokens flow (at most ~10 s)
                await asyncio.sleep(0.05)
                if await generated_tokens(c) > 0:
                    break
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            late = [asyncio.create_task(late_request(c)) for _ in range(5)]
            return await gather_bounded(streams, EXIT_WITHIN_S), await gather_bounded(late, 10)

    async def late_request(c: httpx.AsyncClient) -> int | str:
        try:
            return (await stream_request(c, completion_body("too late", 4))).status
        except httpx.TransportError as err:
            return type(err).__name__

    start = time.monotonic()
    results, late = asyncio.run(burst())
    assert proc.wait(timeout=EXIT_WITHIN_S) == 0
    assert time.monotonic() - start < EXIT_WITHIN_S
    for r in results:
        assert r.ended, r
        if r.status == 200:  # finished, or aborted by the drain after the grace period
            assert r.error is None or r.error["code"] == "aborted", r.error
        else:  # reached the server only after the signal
            assert r.status == 503 and r.error["code"] == "engine_unavailable", r
    cut = [r for r in results if r.error is not None]
    assert cut, "the shutdown cut no stream: the burst was too small to test draining"
    assert any(r.finish_reason == "length" for r in results), "no stream finished normally"
    assert any(r.text for r in cut), "tokens never flowed before the signal"
    for status in late:
        assert status in (503, "ConnectError"), late
