"""Bad requests: each gets its status and OpenAI's error shape, reaches no engine, and leaves the
server serving. Also errors of routing (unknown path, wrong method)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serving.conftest import sse_events
from tests.serving.fake_engine import FakeEngine, expected_text
from tfjax.api import QueueFullError

pytestmark = pytest.mark.anyio

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (endpoint, body as bytes or JSON, status, expected "param" or None)
BAD_REQUESTS = [
    (C, b"{not json", 400, None),
    (C, b"\xff\xfe\x00garbage", 400, None),
    (C, b"[" * 100_000, 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (C, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    (C, {}, 400, "prompt"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": None}, 400, "prompt"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt"),
    (C, {"prompt": [[1], [2]]}, 400, "prompt"),
    (C, {"prompt": [1, -2]}, 400, "prompt"),
    (C, {"prompt": [1, 2.5]}, 400, "prompt"),
    (C, {"prompt": [True]}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 2.0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    (C, {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    (C, {"prompt": "hi", "n": 17}, 400, "n"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (C, {"prompt": "hi", "n": "1"}, 400, "n"),
    (C, {"prompt": "hi", "best_of": 17}, 400, "best_of"),
    (C, {"prompt": "hi", "echo": True}, 400, "echo"),
    (C, {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    (C, {"prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    (C, {"prompt": "hi", "presence_penalty": -3}, 400, "presence_penalty"),
    (C, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    (C, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"2147483648": 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": [1]}, 400, "logit_bias"),
    (C, {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    (C, {"prompt": "hi", "consumption_rate": 0}, 400, "consumption_rate"),
    (C, {"prompt": "hi", "consumption_rate": -5}, 400, "consumption_rate"),
    (C, {"prompt": "hi", "consumption_rate": "fast"}, 400, "consumption_rate"),
    (C, {"prompt": "hi", "priority": "high"}, 400, "priority"),
    (C, {"prompt": "hi", "priority": 2**70}, 400, "priority"),
    (C, {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    (C, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    (C, {"prompt": "hi", "stop": ""}, 400, "stop"),
    (C, {"prompt": "hi", "stop": [1]}, 400, "stop"),
    (C, {"prompt": "hi", "stop": {"a": 1}}, 400, "stop"),
    (C, {"prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
    (C, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"prompt": "hi", "stream": True, "stream_options": []}, 400, "stream_options"),
    (
        C,
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
    ),
    (C, {"prompt": "hi", "model": 3}, 400, "model"),
    (C, {"prompt": "hi", "user": 3}, 400, "user"),
    (C, {"prompt": "x" * 100}, 400, "prompt"),  # longer than max_model_len=64
    (C, {"prompt": "x" * 60, "max_tokens": 10}, 400, "max_tokens"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": ["hi"]}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "messages",
    ),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "bad", "content": "hi"}]}, 400, "messages"),  # template raises
    (CHAT, {"messages": USER, "logprobs": 2}, 400, "logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "max_tokens": 1000}, 400, "max_tokens"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_request(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    path: str,
    body: bytes | dict,
    status: int,
    param: str | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    assert engine.submitted == []
    ok = await client.post(C, json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


async def test_context_length_code(client: httpx.AsyncClient) -> None:
    r = await client.post(C, json={"prompt": "x" * 60, "max_tokens": 10})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "64" in r.json()["error"]["message"]


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await client.get(C)
    assert r.status_code == 405 and "error" in r.json()


async def test_errors_do_not_disturb_a_running_stream(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.token_delay_s = 0.01  # 0.5 s of streaming; the errors below take ~0.05 s
    body = {"prompt": "hi", "max_tokens": 50, "stream": True}
    running = asyncio.create_task(client.post(C, json=body))
    while not engine.submitted:
        await asyncio.sleep(0.001)
    for path, bad, status, _ in BAD_REQUESTS:
        content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        assert (await client.post(path, content=content)).status_code == status
    engine.raise_on_submit = QueueFullError("full")
    assert (await client.post(C, json=body)).status_code == 429
    assert not running.done()  # the errors above were answered while it streamed
    chunks = sse_events((await running).text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text([104, 105], 50)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert engine.aborted == []
