"""Issue 13's live workloads: what the client sends for undeclared, non-streaming and mixed
bursts, and how `tfjax bench compare` tabulates several workloads and repeats."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer

from tfjax.bench import compare as cp
from tfjax.bench.client import ClientConfig, RequestRecord, send_request
from tfjax.bench.compare_report import format_comparison, format_repeats


def test_ordinary_bursts_are_issue_13s() -> None:
    for name, workload in cp.ORDINARY_BURSTS.items():
        reqs = workload.requests(seed=0)
        assert len(reqs) == 32 and {r.arrival_s for r in reqs} == {0.0}, name
        assert {r.output_len for r in reqs} == {64}
        prompts = [r.prompt_len for r in reqs]  # ~17: normal, std 2
        assert abs(sum(prompts) / 32 - 17) < 1.5 and min(prompts) >= 9 and max(prompts) <= 25
    undeclared = cp.ORDINARY_BURSTS["undeclared"].requests(seed=0)
    assert not any(r.declared for r in undeclared) and all(r.stream for r in undeclared)
    assert {r.rate for r in undeclared} == {15.0}  # scored at the server's default rate
    overloaded = cp.ORDINARY_BURSTS["overloaded"].requests(seed=0)
    assert all(r.declared and r.rate == 15.0 for r in overloaded)
    non_streaming = cp.ORDINARY_BURSTS["non-streaming"].requests(seed=0)
    assert not any(r.stream or r.declared for r in non_streaming)
    mixed = cp.ORDINARY_BURSTS["mixed"].requests(seed=0)
    assert sorted((r.rate, r.declared) for r in mixed) == [(2.0, True)] * 16 + [(15.0, False)] * 16


def _send(req, answer: dict) -> tuple[dict, RequestRecord]:
    """Send `req` to a mock server that answers `answer`; returns (the body sent, record)."""
    sent = {}

    async def handler(request: web.BaseRequest) -> web.Response:
        sent.update(await request.json())
        return web.json_response(answer)

    async def go() -> RequestRecord:
        async with RawTestServer(handler) as server, aiohttp.ClientSession() as client:
            cfg = ClientConfig(base_url=str(server.make_url("")).rstrip("/"), model="m")
            return await send_request(client, cfg, req, time.perf_counter())

    return sent, asyncio.run(go())


def test_a_non_streaming_undeclared_request() -> None:
    req = cp.ORDINARY_BURSTS["non-streaming"].requests(seed=0)[0]
    answer = {
        "choices": [{"index": 0, "text": "x" * 64, "finish_reason": "length"}],
        "usage": {"prompt_tokens": req.prompt_len, "completion_tokens": 64},
    }
    body, rec = _send(req, answer)
    assert body["stream"] is False and "stream_options" not in body
    assert "consumption_rate" not in body and body["ignore_eos"] is True
    # All 64 tokens arrive with the response: one chunk, TTFT = the whole latency.
    assert rec.ok and rec.chunk_tokens == [64] and rec.finish_reason == "length"
    assert rec.chunk_times_s[0] == pytest.approx(rec.end_s, abs=0.05)


def test_a_declared_stream_sends_its_rate() -> None:
    req = next(r for r in cp.ORDINARY_BURSTS["mixed"].requests(seed=0) if r.declared)
    body, rec = _send(req, {})  # not SSE: the stream ends without [DONE]
    assert body["stream"] is True and body["consumption_rate"] == 2.0
    assert body["stream_options"] == {"include_usage": True}
    assert rec.error == "stream ended without [DONE]"


def test_comparison_ratios_are_per_workload() -> None:
    keys = ("p99_ttft_s", "mean_e2el_ms", "raw_throughput")
    measured = [
        ("undeclared", "fcfs", (4.0, 10.0, 100.0)),
        ("undeclared", "tokenflow", (4.4, 11.0, 95.0)),
        ("mixed", "fcfs", (2.0, 20.0, 50.0)),
        ("mixed", "tokenflow", (1.0, 30.0, 60.0)),
    ]
    rows = [{"workload": w, "policy": p, **dict(zip(keys, v, strict=True))} for w, p, v in measured]
    table = format_comparison(rows)
    assert "undeclared / tokenflow" in table and "mixed / fcfs" in table
    assert "4.40 (1.10x)" in table and "95.00 (0.95x)" in table  # against undeclared's fcfs
    assert "1.00 (0.50x)" in table and "60.00 (1.20x)" in table  # against mixed's fcfs


def test_unknown_workload_is_an_error() -> None:
    args = cp.build_parser().parse_args(["--out", "x", "--workloads", "undeclared,nope"])
    with pytest.raises(SystemExit, match="unknown workload nope"):
        cp.finish_args(args)


def test_repeats_report_the_median_ratio_to_fcfs_with_its_range() -> None:
    def row(policy: str, repeat: int, raw: float, p99: float) -> dict:
        return {"policy": policy, "repeat": repeat, "raw_throughput": raw, "p99_ttft_s": p99}

    rows = [
        row("fcfs", 0, 100.0, 2.0),
        row("tokenflow", 0, 90.0, 2.0),
        row("fcfs", 1, 100.0, 4.0),
        row("tokenflow", 1, 110.0, 2.0),
        row("fcfs", 2, 80.0, 2.0),
        row("tokenflow", 2, 80.0, 3.0),
    ]
    line = next(x for x in format_repeats(rows).splitlines() if x.startswith("tokenflow"))
    assert "1.00 (0.50-1.50)" in line  # p99 TTFT ratios 1.0, 0.5, 1.5
    assert "1.00 (0.90-1.10)" in line  # raw throughput ratios 0.9, 1.1, 1.0


def test_two_server_commands_side_by_side(tmp_path, capsys) -> None:
    """`--server LABEL URL COMMAND` twice: both fakes start, take turns for two repeats, and the
    ratios are to the first; every run leaves its result and the servers are stopped."""
    import socket
    import sys

    from serving.cli import main as tfjax

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    argv = ["bench", "compare", "--out", str(tmp_path), "--workloads", "undeclared"]
    argv += ["--repeat", "2", "--no-plots", "--disable-tqdm"]
    for label in ("a", "b"):
        port = free_port()
        command = f"{sys.executable} -m tests.bench.fake_openai --port {port} --token-delay-s 0.001"
        argv += ["--server", label, f"http://127.0.0.1:{port}", command]
    assert tfjax(argv) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())
    # The second repeat runs them the other way round, so a drift favours neither.
    assert [(r["policy"], r["repeat"]) for r in rows] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert all(r["failed"] == 0 and r["completed"] == 32 for r in rows)
    assert {p.name for p in (tmp_path / "b" / "repeat1").iterdir()} == {"result.json", "result.csv"}
    out = capsys.readouterr().out
    assert "(ratio to a: median (min-max) over 2 alternating repeats)" in out
