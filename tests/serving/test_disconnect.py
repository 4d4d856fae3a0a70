"""A client that goes away aborts its engine request at once, streaming or not, whether tokens
are flowing or the request is still queued, and whatever ASGI spec version the server speaks.

httpx's ASGITransport buffers whole responses and never disconnects early, so these tests call
the ASGI app directly with a `receive` that reports `http.disconnect` on cue.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.applications import Starlette

from tests.serving.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


async def call_app(
    app: Starlette,
    path: str,
    body: dict[str, Any],
    disconnect: asyncio.Event,
    *,
    spec_version: str = "2.3",
) -> list[dict[str, Any]]:
    """Run one request through the app; `receive` blocks until `disconnect` is set."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a real server may suspend a writer (flow control)
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_disconnect_mid_stream(app: Starlette, engine: FakeEngine, spec_version: str) -> None:
    engine.max_model_len = 100_000
    engine.token_delay_s = 0.01
    disconnect = asyncio.Event()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000, "stream": True}
    task = asyncio.create_task(
        call_app(app, "/v1/chat/completions", body, disconnect, spec_version=spec_version)
    )
    while not engine.submitted:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.1)  # a few tokens flow
    disconnect.set()
    sent = await task
    assert sent[0]["status"] == 200
    assert any(b'"content"' in m.get("body", b"") for m in sent)
    assert engine.aborted == [engine.submitted[0].request_id]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_disconnect_while_queued(
    app: Starlette, engine: FakeEngine, spec_version: str
) -> None:
    engine.first_token_delay_s = 3600  # never leaves the waiting queue
    disconnect = asyncio.Event()
    body = {"prompt": "hi", "stream": True}
    task = asyncio.create_task(
        call_app(app, "/v1/completions", body, disconnect, spec_version=spec_version)
    )
    await asyncio.sleep(0.05)
    disconnect.set()
    await task
    assert engine.aborted == [engine.submitted[0].request_id]


async def test_disconnect_non_streaming(app: Starlette, engine: FakeEngine) -> None:
    engine.first_token_delay_s = 3600
    disconnect = asyncio.Event()
    task = asyncio.create_task(call_app(app, "/v1/completions", {"prompt": "hi"}, disconnect))
    await asyncio.sleep(0.05)
    disconnect.set()
    await task
    assert engine.aborted == [engine.submitted[0].request_id]


async def test_cancelled_handler_aborts(app: Starlette, engine: FakeEngine) -> None:
    """uvicorn cancels handlers that outlive the graceful-shutdown timeout."""
    engine.first_token_delay_s = 3600
    task = asyncio.create_task(
        call_app(app, "/v1/completions", {"prompt": "hi", "stream": True}, asyncio.Event())
    )
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == [engine.submitted[0].request_id]


async def test_finished_stream_is_not_aborted(app: Starlette, engine: FakeEngine) -> None:
    disconnect = asyncio.Event()
    sent = await call_app(
        app, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True}, disconnect
    )
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert sent[-2]["body"] == b"data: [DONE]\n\n"
    assert engine.aborted == []


@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_the_response_starts(
    app: Starlette, engine: FakeEngine, stream: bool
) -> None:
    engine.first_token_delay_s = 3600
    disconnect = asyncio.Event()
    disconnect.set()
    await call_app(app, "/v1/completions", {"prompt": "hi", "stream": stream}, disconnect)
    assert engine.aborted == [engine.submitted[0].request_id]
