"""Body size and nesting limits: 413 in OpenAI's error shape before parsing, 400 for bodies that
nest deeper than `MAX_JSON_DEPTH`; nothing reaches the engine and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from serving.app import create_app
from serving.protocol import MAX_JSON_DEPTH, json_depth
from tests.serving.fake_engine import FakeEngine, expected_text

pytestmark = pytest.mark.anyio

C = "/v1/completions"
LIMIT = 200


@pytest.fixture
async def small_client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine, served_model_name="fake", max_request_bytes=LIMIT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def padded_body(size: int) -> bytes:
    """A valid completion body of exactly `size` bytes (padding in an ignored field)."""
    head = json.dumps({"prompt": "hi", "max_tokens": 2, "pad": ""}).encode()
    body = head[:-2] + b"x" * (size - len(head)) + b'"}'
    assert len(body) == size
    return body


def assert_too_large(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert str(LIMIT) in error["message"]


async def test_body_at_the_limit_is_served(
    small_client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await small_client.post(C, content=padded_body(LIMIT))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected_text([104, 105], 2)
    assert len(engine.submitted) == 1


async def test_declared_length_above_the_limit_gets_413(
    small_client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    assert_too_large(await small_client.post(C, content=padded_body(LIMIT + 1)))
    assert engine.submitted == []
    assert (await small_client.post(C, content=padded_body(LIMIT))).status_code == 200


async def test_chunked_body_above_the_limit_gets_413(
    small_client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        body = padded_body(LIMIT + 50)
        for i in range(0, len(body), 64):
            yield body[i : i + 64]

    assert_too_large(await small_client.post(C, content=chunks()))
    assert engine.submitted == []


def nested(depth: int) -> dict:
    """A valid completion body whose JSON nests exactly `depth` levels (the object is one)."""
    value: object = 0
    for _ in range(depth - 1):
        value = [value]
    return {"prompt": "hi", "max_tokens": 2, "extra": value}


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_json_depth_counts_levels(depth: int) -> None:
    assert json_depth(nested(depth)) == depth
    assert json_depth(3) == 0 and json_depth({"a": {"b": []}}) == 3


async def test_nesting_limit(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    assert (await client.post(C, json=nested(MAX_JSON_DEPTH))).status_code == 200
    deep = 100_000  # beyond the JSON decoder's recursion limit
    for body in (
        json.dumps(nested(MAX_JSON_DEPTH + 1)).encode(),
        b'{"prompt": "hi", "x": ' + b"[" * deep + b"]" * deep + b"}",
    ):
        r = await client.post(C, content=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert len(engine.submitted) == 1
