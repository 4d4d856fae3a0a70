"""`tfjax bench serve` end to end: against a fake server answering in vLLM's chunk shapes (both
endpoints, streaming and not), and against tfjax's own server (the real app and engine on a
paced fake runner). The files it saves hold what the table printed, one CSV row per request."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from serving.cli import main as tfjax
from tests.bench.fake_openai import MODEL, running_server
from tests.reliability.harness import PacedRunner, make_engine, serve
from tfjax.bench.client import ClientConfig, run_requests, sse_lines
from tfjax.bench.report import CSV_COLUMNS
from tfjax.bench.workload import ClientRequest

SMALL = ["--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "5"]
NO_SPREAD = ["--random-input-len-std", "0", "--random-output-len-std", "0"]


def _bench(base_url: str, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    argv = ["bench", "serve", "--base-url", base_url, *SMALL, *NO_SPREAD, "--disable-tqdm"]
    argv += ["--save-result", "--result-dir", str(out), "--result-filename", "run", *extra]
    assert tfjax(argv) == 0
    with open(out / "run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    text = (out / "run.json").read_text()
    result = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    return result, rows


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_against_vllm_chunk_shapes(endpoint: str, tmp_path: Path, capsys) -> None:
    with running_server(token_delay_s=0.01) as url:
        result, rows = _bench(url, tmp_path, "--endpoint", endpoint)
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["config"]["model"] == result["model_id"] == MODEL  # from /v1/models
    assert (result["num_prompts"], result["request_rate"]) == (4, "inf")  # vLLM's keys
    # One token per content chunk; the role-only chat delta and the usage chunk carry none.
    assert result["total_output_tokens"] == 4 * 5 and result["tokens_added_at_end"] == 0
    assert result["total_input_tokens"] == 4 * 8  # the final usage chunk's prompt_tokens
    assert result["preemptions"] is None  # no /metrics there
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert result[f"mean_{name}_ms"] > 0 and result[f"p99_{name}_ms"] > 0
    assert result["mean_itl_ms"] == pytest.approx(10, abs=8)  # one chunk every 10 ms
    assert len(result["requests"]) == 4 and all(r["finish_reason"] == "length" for r in rows)
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 4
    assert [int(r["output_tokens"]) for r in rows] == [5] * 4
    assert "Successful requests:" in capsys.readouterr().out


class _Reads:
    """A response body that arrives in the given network reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def iter_any(self):
        for read in self.reads:
            yield read


def test_sse_lines_end_only_where_sse_ends_a_line() -> None:
    """U+2028 and U+0085 inside an event's JSON stay in its line, and a CRLF split across two
    reads or a line split mid-UTF-8 character loses nothing."""
    event = 'data: {"text": "a\u2028b\u0085c\u00e9"}'.encode()
    reads = [event[:-3], event[-3:] + b"\r", b"\n\r\ndata: [DONE]\r\n\r\n"]

    async def lines() -> list[bytes]:
        return [line async for line in sse_lines(_Reads(reads))]

    data = [line for line in asyncio.run(lines()) if line]
    assert data == [event, b"data: [DONE]"]
    assert json.loads(data[0][5:])["text"] == "a\u2028b\u0085c\u00e9"


def test_non_streaming_requests_count_the_usage(tmp_path: Path) -> None:
    req = ClientRequest(index=0, arrival_s=0.0, prompt_len=3, output_len=6, rate=5.0, stream=False)
    with running_server(token_delay_s=0.001) as url:
        cfg = ClientConfig(base_url=url, model=MODEL)
        (rec,), _ = asyncio.run(run_requests(cfg, [req], progress=False))
    assert rec.ok and rec.chunk_tokens == [6] and rec.prompt_len == 3


def test_against_tfjax_serve(tmp_path: Path) -> None:
    engine = make_engine(PacedRunner(num_pages=256, page_size=16, step_s=0.002), policy="tokenflow")
    with serve(engine) as live:
        result, rows = _bench(live.url, tmp_path, "--prompt-mode", "text", "--rate-mix", "50")
    assert result["completed"] == 4 and result["failed"] == 0, result["errors"]
    assert result["total_output_tokens"] == 20  # ignore_eos forces max_tokens
    assert result["preemptions"] == 0  # tfjax_preemptions_total was scraped
    assert result["effective_throughput"] > 0 and result["stall_ratio"] >= 0
    assert all(float(r["ttft_s"]) > 0 for r in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _fake_process(token_delay_s: float) -> Iterator[int]:
    """The fake server as its own process (its CPU time is not the client's); yields its port."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tests.bench.fake_openai", "--port", str(port)]
    fake = subprocess.Popen(
        [*cmd, "--token-delay-s", str(token_delay_s)], cwd=Path(__file__).parents[2]
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield port
    finally:
        fake.terminate()
        fake.wait(30)


@pytest.mark.slow  # 256 streams; prints the figure, asserts nothing about a busy machine's speed
def test_client_overhead_at_256_streams(tmp_path: Path) -> None:
    """The client's own CPU per wall second against canned tokens (target: below 0.05)."""
    with _fake_process(token_delay_s=0.05) as port:
        argv = ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--disable-tqdm"]
        argv += ["--num-prompts", "256", "--max-concurrency", "256", "--random-output-len", "128"]
        argv += ["--save-result", "--result-dir", str(tmp_path)]
        assert tfjax(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 256
    print(f"client CPU s / wall s at 256 streams: {result['client_cpu_per_wall']:.3f}")
    assert os.cpu_count() and result["client_cpu_s"] > 0


@pytest.mark.slow  # 256 streams; prints the floor the target is judged against
def test_client_floor_at_256_streams() -> None:
    """The least CPU any Python client spends on the same 256 streams: one thread, epoll, one
    recv per ready socket and a timestamp, no HTTP or SSE parsing. Each stream must end with
    HTTP's last chunk, so the reads counted are the whole streams."""
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 128, "stream": True})
    with _fake_process(token_delay_s=0.05) as port:
        head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(256)]
        reads: list[list[tuple[float, bytes]]] = [[] for _ in socks]
        selector = selectors.DefaultSelector()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for sock, stream_reads in zip(socks, reads, strict=True):
            sock.sendall((head + body).encode())
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, stream_reads)
        ended = 0
        while ended < len(socks):
            events = selector.select(timeout=30)
            assert events, "a stream stalled"
            for key, _ in events:
                data = key.fileobj.recv(65536)
                key.data.append((time.perf_counter(), data))
                if not data or data.endswith(b"0\r\n\r\n"):  # HTTP's last chunk
                    selector.unregister(key.fileobj)
                    ended += 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        for sock in socks:
            sock.close()
    for stream_reads in reads:
        assert b"data: [DONE]" in b"".join(data for _, data in stream_reads)
    num_reads = sum(map(len, reads))
    print(
        f"floor at 256 streams: {num_reads / wall:.0f} reads/s, CPU s / wall s {cpu / wall:.3f},"
        f" {1e6 * cpu / num_reads:.1f} us a read"
    )


def test_cpu_of_reports_what_each_process_used_during_the_run(tmp_path: Path, capsys) -> None:
    """`--cpu-of`: a process that spins gets CPU seconds (at most its wall time: one thread),
    one that sleeps gets none; a process that is not there is a clear error."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.2)
        with running_server(token_delay_s=0.05) as url:
            result, _ = _bench(url, tmp_path, "--cpu-of", str(spin.pid), str(idle.pid))
    finally:
        spin.kill()
        idle.kill()
        spin.wait()
        idle.wait()
    wall = result["duration"]
    assert 0.05 < result[f"cpu_s_of_pid_{spin.pid}"] <= wall + 0.1
    assert result[f"cpu_s_of_pid_{idle.pid}"] < 0.02
    assert f"CPU s of process {spin.pid}:" in capsys.readouterr().out
    gone = ["--base-url", "http://127.0.0.1:9", "--model", MODEL, "--cpu-of", str(idle.pid)]
    assert tfjax(["bench", "serve", *gone]) == 2
    assert f"--cpu-of {idle.pid}: cannot read" in capsys.readouterr().err
