"""The server's edges on a real socket: a huge declared body is refused before it is sent, and
a streaming client that stops reading is dropped after `stream_idle_timeout_s`, its request
aborted and its pages freed, while a client that reads is served to the end."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

from tests.reliability.harness import (
    PAGE_SIZE,
    PacedRunner,
    TextTokenizer,
    client,
    completion_body,
    expected_text,
    make_engine,
    pages_in_use,
    serve,
    stream_request,
    wait_until,
)
from tests.reliability.test_slow_readers import (
    SEND_BUFFER_BYTES,
    STALLED_TOKENS,
    open_stalled_stream,
)
from tfjax.request import FinishReason

IDLE_TIMEOUT_S = 0.5  # STALLED_TOKENS at >= 10 ms a step would take the engine >= 6 s


def test_declared_body_above_the_limit_is_refused_before_it_is_sent() -> None:
    engine = make_engine()
    with serve(engine, max_request_bytes=1000) as live:
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000000\r\n\r\n"
            )  # ...and not one byte of the body
            head = sock.recv(65536).decode()
        assert head.startswith("HTTP/1.1 413"), head
        body = json.loads(head.split("\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_too_large"
        assert engine.engine.seen == {}
        assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200


def test_a_client_that_stops_reading_is_dropped_and_its_pages_freed() -> None:
    tokenizer = TextTokenizer(width=256)  # ~260 bytes per event: the buffers fill in few steps
    runner = PacedRunner(num_pages=2048, page_size=PAGE_SIZE, max_model_len=700, step_s=0.01)
    engine = make_engine(runner, tokenizer=tokenizer)
    probe = engine.engine
    with serve(
        engine, send_buffer_bytes=SEND_BUFFER_BYTES, stream_idle_timeout_s=IDLE_TIMEOUT_S
    ) as live:
        stalled = open_stalled_stream(live.port, "stalled")
        try:
            wait_until(lambda: len(probe.seen) == 1, 10, "the stalled request")
            (request,) = probe.seen.values()
            start = time.monotonic()

            async def reader() -> object:
                async with client(live.url, timeout_s=30) as c:
                    return await stream_request(c, completion_body("reader", 40))

            ok = asyncio.run(reader())  # ~0.5 s of streaming: outlives the idle timeout
            assert ok.ok and ok.text == expected_text(tokenizer, "reader", 40), ok
            wait_until(lambda: request.is_finished, 10, "the stalled request to be dropped")
            assert request.finish_reason is FinishReason.ABORT
            assert request.num_output_tokens < STALLED_TOKENS
            assert time.monotonic() - start < 5.0
            wait_until(lambda: not live.app_server._live, 5, "the handler to end")
            wait_until(lambda: not probe.has_work, 5, "the engine to go idle")
            assert request.page_ids == [] and pages_in_use(engine) == (0, 0)
            assert httpx.get(f"{live.url}/health?deep=1", timeout=15).status_code == 200
        finally:
            stalled.close()
