"""`tfjax bench serve`'s client and metrics against a fake OpenAI SSE server with a known token
schedule.

The fake server (Starlette under uvicorn on 127.0.0.1, in a thread) streams each request's tokens
at fixed delays after it arrives, chosen by `max_tokens`:

- 5 tokens, reader rate 10 tok/s, text chunks at 0.3, 0.4, 0.5, 1.0, 1.1 s: TTFT 0.3 s; token 4
  is due at 0.6 s and comes at 1.0 s, a 0.4 s stall; no buffer ever, so all 5 tokens weigh 1.
- 10 tokens, rate 1 tok/s, chunks with `token_ids` of 4 then 6 tokens at 0.2 and 0.25 s: the
  buffers when tokens arrive are 0, 0, 1, 2, 3, ... and with L = 10 only B <= 1 weighs 1, B = 2
  weighs 0, so 3 effective tokens; no stall.
- 3 tokens, rate 5 tok/s, text chunks at 0.2 and 0.3 s but usage says 3: the missing token is
  added to the last chunk (`tokens_added_at_end` = 1). Token 2 is read at 0.4 s, so token 3
  finds a buffer of 1 > 0.2 L = 0.6 and weighs 0: 2 effective tokens; no stall.
- `max_tokens` 7: HTTP 429, a failed request.

Hand-computed values are checked with tolerances for scheduling jitter on a busy machine, and
exactly against docs/definitions.md's formulas applied to the arrival times the client recorded.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.bench.fake_openai import serving_app
from tfjax.bench import calibrate, client, compare_report, report, run
from tfjax.bench import workload as wc
from tfjax.sim.workload import assign_rates

# max_tokens -> (chunk kind, [(delay after arrival s, tokens)], usage completion_tokens)
SCHEDULES = {
    5: ("text", [(0.3, 1), (0.4, 1), (0.5, 1), (1.0, 1), (1.1, 1)], 5),
    10: ("ids", [(0.2, 4), (0.25, 6)], 10),
    3: ("text", [(0.2, 1), (0.3, 1)], 3),
}
RATES = {5: 10.0, 10: 1.0, 3: 5.0, 7: 15.0}


def _fake_app() -> Starlette:
    calls = {"n": 0}

    async def completions(request: Request) -> Response:
        start = time.monotonic()
        body = await request.json()
        calls["n"] += 1
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["consumption_rate"] == RATES[body["max_tokens"]]
        if body["max_tokens"] not in SCHEDULES:
            return JSONResponse({"error": {"message": "queue full"}}, status_code=429)
        kind, schedule, total = SCHEDULES[body["max_tokens"]]

        def event(choices: list, usage: dict | None = None) -> bytes:
            return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n".encode()

        async def events():
            yield b": ping\n\n"
            for delay, n in schedule:
                await asyncio.sleep(max(0.0, start + delay - time.monotonic()))
                choice = {"index": 0, "text": "tok" * n, "finish_reason": None}
                if kind == "ids":
                    choice["token_ids"] = list(range(n))
                yield event([choice])
            yield event([{"index": 0, "text": "", "finish_reason": "length"}])
            yield event([], {"prompt_tokens": len(body["prompt"]), "completion_tokens": total})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def metrics(request: Request) -> Response:
        text = f"# TYPE tfjax_preemptions counter\ntfjax_preemptions_total {calls['n']}.0\n"
        return PlainTextResponse(text)

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/metrics", metrics),
        ]
    )


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serving_app(_fake_app()) as url:
        yield url


def _design_stall_and_weights(times: list[float], rate: float) -> tuple[float, float]:
    """docs/definitions.md's reader model and token weights, written out independently of tfjax."""
    stall, read, weights, reads = 0.0, None, [], []
    for g in times:
        if read is None:
            buffer, read = 0, g
        else:
            buffer = sum(c > g for c in reads)
            stall += max(0.0, g - (read + 1 / rate))
            read = max(read + 1 / rate, g)
        reads.append(read)
        weights.append(buffer)
    tau = 0.1 * len(times)
    w = [1.0 if b <= tau else max(0.0, 1 - (b - tau) / tau) for b in weights]
    return stall, sum(w)


def test_client_metrics_against_a_known_schedule(base_url: str, tmp_path: Path) -> None:
    requests = [
        wc.ClientRequest(index=i, arrival_s=0.0, prompt_len=4, output_len=n, rate=RATES[n])
        for i, n in enumerate((5, 10, 3, 7))
    ]
    cfg = client.ClientConfig(base_url=base_url, model="fake", request_timeout_s=20)
    result, records = asyncio.run(run.benchmark(cfg, requests, progress=False))
    by_len = {r.max_tokens: r for r in records}

    assert result["completed"] == 3 and result["failed"] == 1
    assert by_len[7].error.startswith("HTTP 429")
    assert [r.output_tokens for r in records] == [5, 10, 3, 0]
    assert by_len[10].chunk_tokens == [4, 6]
    assert by_len[3].chunk_tokens == [1, 2] and by_len[3].tokens_added_at_end == 1
    assert result["total_output_tokens"] == 18 and result["total_input_tokens"] == 12
    assert result["preemptions"] == 4  # the fake counts completion calls as "preemptions"

    rows = {row["max_tokens"]: row for row in result["requests"]}
    assert rows[5]["ttft_s"] == pytest.approx(0.3, abs=0.1)
    assert rows[10]["ttft_s"] == pytest.approx(0.2, abs=0.1)
    assert rows[5]["stall_s"] == pytest.approx(0.4, abs=0.1)
    assert rows[10]["stall_s"] == 0.0 and rows[3]["stall_s"] == 0.0
    assert [rows[n]["effective_tokens"] for n in (5, 10, 3)] == [5.0, 3.0, 2.0]

    # Exactly docs/definitions.md's definitions on the recorded times.
    stall_sum, eff_sum = 0.0, 0.0
    for r in records[:3]:
        times = [t for t, n in zip(r.chunk_times_s, r.chunk_tokens, strict=True) for _ in range(n)]
        stall, eff = _design_stall_and_weights(times, r.rate)
        assert r.send_s <= times[0]
        stall_sum, eff_sum = stall_sum + stall, eff_sum + eff
    span = max(r.chunk_times_s[-1] for r in records[:3]) - min(r.send_s for r in records[:3])
    assert eff_sum == 10.0
    assert result["effective_tokens"] == 10.0
    assert result["effective_throughput"] == pytest.approx(10.0 / span)
    assert result["raw_throughput"] == pytest.approx(18.0 / span)
    assert span == pytest.approx(1.1, abs=0.15)
    reading = 5 / 10 + 10 / 1 + 3 / 5
    assert result["stall_ratio"] == pytest.approx(stall_sum / reading)
    assert result["stall_ratio"] == pytest.approx(0.4 / reading, abs=0.01)
    ttfts = [r.chunk_times_s[0] - r.send_s for r in records[:3]]
    assert result["mean_ttft_ms"] == pytest.approx(sum(ttfts) / 3 * 1e3)
    assert result["mean_ttft_s"] == pytest.approx(sum(ttfts) / 3)
    # ITL per chunk: 4 + 1 + 1 gaps; the 0.5 s gap of the first request is the largest.
    assert result["p99_itl_ms"] == pytest.approx(500, abs=100)

    json.dumps(result, allow_nan=False)  # strict JSON
    report.save(result, records, tmp_path, plots=True)
    assert {p.name for p in tmp_path.iterdir()} == {
        "result.json",
        "result.csv",
        "timelines.png",
        "ttft_cdf.png",
        "buffers.png",
    }
    assert "Effective throughput" in report.format_table(result)


def test_calibration_derives_the_paper_regime() -> None:
    targets = calibrate.RegimeTargets(
        resident=4,
        oversubscription=2.5,
        headroom=0.6,
        rate_mix_shape="15:0.4,20:0.6",
        input_len=64,
        max_output_len=128,
        page_size=16,
        run_budget_s=30.0,
    )
    w = calibrate.derive_workload({1: 30.0, 4: 80.0}, targets)
    assert w.burst_size == 10  # > R = 4 resident
    assert w.rate_mix == "4:0.4,5.3:0.6"  # 0.6 * 80 tok/s over 10 readers, 15:20 kept
    rates = assign_rates(w.rate_mix, 10, random.Random(0))
    assert sum(rates) == pytest.approx(0.6 * 80.0, rel=0.01)  # the burst reads < Gamma(R)
    assert w.output_len == int(0.6 * 30 * 4.0)  # 72: the slowest reader's share of the budget
    assert w.kv_pages == 48  # 4 * ceil((64 + 72) / 16) + 1 = 37, rounded up to 16
    rec = client.RequestRecord(index=0, rate=1.0, prompt_len=1, max_tokens=4, scheduled_s=0.0)
    rec.chunk_times_s, rec.chunk_tokens, rec.output_tokens = [0.0, 1.0, 2.0, 3.0], [1] * 4, 4
    other = client.RequestRecord(index=1, rate=1.0, prompt_len=1, max_tokens=3, scheduled_s=0.0)
    other.chunk_times_s, other.chunk_tokens, other.output_tokens = [0.5, 1.5, 2.5], [1] * 3, 3
    # Window (0.5, 2.5]: tokens at 1.0, 2.0 and 1.5, 2.5 -> 4 tokens in 2 s.
    assert calibrate.steady_decode_rate([rec, other]) == pytest.approx(2.0)
    keys = ("mean_ttft_s", "p99_ttft_s", "effective_throughput", "raw_throughput", "stall_ratio")
    rows = [
        {"policy": "fcfs", **dict(zip(keys, (2.0, 4.0, 10.0, 20.0, 0.1), strict=True))},
        {"policy": "tokenflow", **dict(zip(keys, (1.0, 1.0, 15.0, 20.0, 0.05), strict=True))},
    ]
    table = compare_report.format_comparison(rows)
    assert "1.00 (0.50x)" in table and "15.00 (1.50x)" in table
