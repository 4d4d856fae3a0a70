"""Clients that send a streaming request and then never read the socket: the server's writes
to them stall (TCP and uvicorn buffers fill up), but the engine finishes their requests and
frees their pages, every other stream completes, and closing the stalled sockets ends their
handlers."""

from __future__ import annotations

import asyncio
import json
import socket

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

NUM_STALLED = 4
STALLED_TOKENS = 600  # x ~420 bytes per SSE event: far more than the buffers hold
SEND_BUFFER_BYTES = 16 << 10
NUM_OTHERS = 40


def open_stalled_stream(port: int, prompt: str) -> socket.socket:
    """Send a streaming completion request on a socket with a tiny receive buffer, and never
    read from it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # set before connect
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(completion_body(prompt, STALLED_TOKENS)).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


async def others(url: str) -> list:
    async with client(url, timeout_s=30) as c:
        calls = [stream_request(c, completion_body(f"other {i}", 16)) for i in range(NUM_OTHERS)]
        return await gather_bounded(calls, timeout_s=30)


def test_readers_that_stop_reading_block_nobody() -> None:
    tokenizer = TextTokenizer(width=256)  # long text per token: the socket fills up fast
    runner = PacedRunner(num_pages=2048, page_size=PAGE_SIZE, max_model_len=700, step_s=0.001)
    engine = make_engine(runner, tokenizer=tokenizer, max_batch_size=16)
    probe = engine.engine
    with serve(engine, send_buffer_bytes=SEND_BUFFER_BYTES) as live:
        stalled = [open_stalled_stream(live.port, f"stalled {i}") for i in range(NUM_STALLED)]
        try:
            wait_until(lambda: len(probe.seen) == NUM_STALLED, 10, "the stalled requests")
            stalled_ids = list(probe.seen)
            results = asyncio.run(others(live.url))
            for i, r in enumerate(results):
                assert r.ok and r.text == expected_text(tokenizer, f"other {i}", 16), r
            # The engine is not held back by the sockets: it finishes the stalled requests too.
            wait_until(lambda: not probe.has_work, 20, "the stalled requests to finish")
            for rid in stalled_ids:
                assert probe.seen[rid].finish_reason is FinishReason.LENGTH
                assert probe.seen[rid].page_ids == []
            # ...while their handlers are still stuck writing to the clients.
            assert set(stalled_ids) <= live.app_server._live, "the writes never stalled"
            assert httpx.get(f"{live.url}/health?deep=1", timeout=15).status_code == 200
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: not live.app_server._live, 10, "stalled handlers to end")
        stats = engine.stats()
        assert (stats.device_pages_used, stats.host_pages_used) == (0, 0)
