"""The HTTP app against `FakeEngine`: response shapes, SSE framing, parameter passthrough,
engine errors, health, models and draining. Bad bodies are in `test_errors.py`, disconnects
in `test_disconnect.py`, metrics in `test_prom.py`."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from starlette.applications import Starlette

from serving.app import drain
from tests.serving.conftest import DEFAULT_RATE, sse_events
from tests.serving.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tfjax.api import EngineDeadError, PromptTooLongError, QueueFullError

pytestmark = pytest.mark.anyio

TOK = FakeTokenizer()
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
CHAT_PROMPT = TOK.encode(TOK.apply_chat_template(MESSAGES))


def _check_stream_header(events: list) -> None:
    """Same id, created and model on every chunk; [DONE] last and only last."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["model"] == "fake"


async def test_completion_non_streaming(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 5}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "fake"
    (choice,) = body["choices"]
    assert choice["text"] == expected_text(TOK.encode("hi"), 5)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_completion_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
    assert r.status_code == 200
    assert engine.submitted[0].streaming
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    _check_stream_header(events)
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text([104, 105], 4)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]


async def test_completion_streaming_usage(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events((await client.post("/v1/completions", json=body)).text)
    _check_stream_header(events)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert events[-3]["choices"][0]["finish_reason"] == "length"


async def test_chat_streaming(client: httpx.AsyncClient) -> None:
    body = {
        "model": "fake",
        "messages": MESSAGES,
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await client.post("/v1/chat/completions", json=body)
    events = sse_events(r.text)
    _check_stream_header(events)
    role, *content, finish, usage_chunk = events[:-1]
    assert role["id"].startswith("chatcmpl-") and role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == expected_text(
        CHAT_PROMPT, 3
    )
    assert all(c["choices"][0]["finish_reason"] is None for c in [role, *content])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["prompt_tokens"] == len(CHAT_PROMPT)


async def test_chat_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    messages = [MESSAGES[0], {"role": "user", "content": parts}]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": expected_text(CHAT_PROMPT, 4),
    }
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(CHAT_PROMPT)
    assert engine.submitted[0].prompt_ids == CHAT_PROMPT  # text parts joined


async def test_chat_default_max_tokens_is_rest_of_context(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 200
    assert engine.submitted[0].sampling.max_tokens == engine.max_model_len - len(CHAT_PROMPT)
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert engine.submitted[1].sampling.max_tokens == 16  # OpenAI's completions default


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string(client: httpx.AsyncClient, engine: FakeEngine, stream: bool) -> None:
    full = expected_text(TOK.encode("hi"), 10)
    stop = full[4:6]
    body = {"prompt": "hi", "max_tokens": 10, "stop": [stop, "zzz"], "stream": stream}
    r = await client.post("/v1/completions", json=body)
    assert engine.submitted[0].sampling.stop == (stop, "zzz")
    if stream:
        chunks = sse_events(r.text)[:-1]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        text, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
    assert (text, reason) == (full[:4], "stop")


async def test_parameters_pass_through(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {
        "prompt": [100, 101, 102],
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 42,
        "stop": "\n",
        "stop_token_ids": [7],
        "ignore_eos": True,
        "consumption_rate": 20,
        "priority": -3,
        "user": "u1",
        "n": 1,
        "presence_penalty": 0,
        "logprobs": None,
        "some_vendor_extra": {"x": 1},  # unknown fields are ignored
    }
    assert (await client.post("/v1/completions", json=body)).status_code == 200
    (sub,) = engine.submitted
    assert sub.prompt_ids == [100, 101, 102]
    s = sub.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (7, 0.5, 0.9, 40, 42)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("\n",), (7,), True)
    assert (sub.consumption_rate, sub.priority) == (20.0, -3)
    assert sub.request_id.startswith("cmpl-")
    assert not sub.streaming  # no "stream": the client reads the whole answer at the end


async def test_defaults(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert (await client.post("/v1/completions", json={"prompt": "hi"})).status_code == 200
    (sub,) = engine.submitted
    assert sub.consumption_rate == DEFAULT_RATE
    assert not sub.streaming
    s = sub.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (1.0, 1.0, 0, None, ())


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (QueueFullError("8 waiting"), 429, "queue_full"),
        (PromptTooLongError("does not fit the KV pool"), 400, "context_length_exceeded"),
        (EngineDeadError("thread died"), 503, "engine_unavailable"),
    ],
)
async def test_submit_errors(
    client: httpx.AsyncClient, engine: FakeEngine, error: Exception, status: int, code: str
) -> None:
    engine.raise_on_submit = error
    for stream in (False, True):
        r = await client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
        assert r.status_code == status
        assert r.json()["error"]["code"] == code
    engine.raise_on_submit = None
    assert (await client.post("/v1/completions", json={"prompt": "hi"})).status_code == 200


async def test_engine_error_mid_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    body = {"messages": MESSAGES, "max_tokens": 5, "stream": True}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert (
        events[-2]["error"]["type"] == "server_error" and "boom" in events[-2]["error"]["message"]
    )
    assert all("error" not in e for e in events[:-2])
    r = await client.post("/v1/chat/completions", json={**body, "stream": False})
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]


async def test_health(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    engine.healthy = False
    assert (await client.get("/health")).status_code == 503
    r = await client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert engine.submitted == []


async def test_models(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert (card["id"], card["object"], card["max_model_len"]) == ("fake", "model", 64)


async def test_one_log_line_per_request(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tfjax.requests")
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    lines = [r.getMessage() for r in caplog.records if r.name == "tfjax.requests"]
    assert len(lines) == 2
    assert all("finish=length prompt_tokens=2 output_tokens=3 ttft_ms=" in line for line in lines)


async def test_drain_aborts_running_streams(
    app: Starlette, client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.token_delay_s = 0.01
    body = {"prompt": "hi", "max_tokens": 60, "stream": True}
    running = asyncio.create_task(client.post("/v1/completions", json=body))
    while not engine.submitted:
        await asyncio.sleep(0.01)
    await drain(app, grace_s=0.05)
    events = sse_events((await running).text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "aborted"
    assert engine.aborted == [engine.submitted[0].request_id]
    assert (await client.get("/health")).status_code == 503
    assert (await client.post("/v1/completions", json={"prompt": "hi"})).status_code == 503


async def test_drain_lets_short_streams_finish(
    app: Starlette, client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.token_delay_s = 0.01
    body = {"prompt": "hi", "max_tokens": 5, "stream": True}
    running = asyncio.create_task(client.post("/v1/completions", json=body))
    while not engine.submitted:
        await asyncio.sleep(0.01)
    await drain(app, grace_s=5)
    events = sse_events((await running).text)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert engine.aborted == []
