"""Fixtures: a `FakeEngine`, the app serving it as "fake", an httpx client and the `openai`
client on that app, and a real `AsyncEngine` frozen in a hand-computed state (`async_engine`).
A module that defines a `served` engine (`tests.serving.tiny_engine`) gets `http` and
`served_oai`, the httpx and `openai` clients of the app serving it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from serving.app import create_app
from tests.serving.fake_engine import FakeEngine
from tests.serving.scripted_engine import scripted_async_engine
from tests.serving.tiny_engine import app_client, openai_client
from tfjax.async_engine import AsyncEngine

DEFAULT_RATE = 12.5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine) -> Starlette:
    return create_app(engine, served_model_name="fake", default_consumption_rate=DEFAULT_RATE)


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
async def oai(app: Starlette) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official `openai` client on the app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as http:
        yield openai.AsyncOpenAI(
            base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0
        )


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, decoded; `[DONE]` stays a string."""
    assert body.endswith("\n\n"), body
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def async_engine() -> Iterator[AsyncEngine]:
    """The hand-computed engine state of `tests.serving.scripted_engine`."""
    yield from scripted_async_engine()


@pytest.fixture
async def http(served: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(served):
        yield client


@pytest.fixture
def served_oai(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai_client(http)
