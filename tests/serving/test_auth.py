"""`create_app(api_key=...)`: 401 in OpenAI's error shape on every `/v1/*` route and the
dashboard without the right bearer key, streamed or not; the same answers as without a key
once it is sent; `/health` and `/metrics` open (`/metrics` closed with `protect_metrics`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from tests.serving.fake_engine import FakeEngine, expected_text
from tfjax.async_engine import AsyncEngine

pytestmark = pytest.mark.anyio

KEY = "sk-test-0123456789"
COMPLETION = {"model": "fake", "prompt": "hi", "max_tokens": 3}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/completions", COMPLETION),
    ("POST", "/v1/completions", {**COMPLETION, "stream": True}),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/no-such-route", None),
    ("GET", "/dashboard", None),
    ("GET", "/dashboard/state", None),
]
WRONG = [
    {},
    {"Authorization": "Bearer sk-wrong"},
    {"Authorization": f"Bearer {KEY}x"},
    {"Authorization": f"Basic {KEY}"},
    {"Authorization": KEY},
]


@pytest.fixture
async def keyed(async_engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """A client on a keyed app over the fake engine (generation) whose dashboard state is the
    hand-computed engine's, so that every protected route has a 200 to give."""
    engine = FakeEngine()
    engine.live_state = async_engine.live_state
    app = create_app(engine, served_model_name="fake", api_key=KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize("headers", WRONG)
async def test_protected_routes_refuse_a_missing_or_wrong_key(
    keyed: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> None:
    r = await keyed.request(method, path, json=body, headers=headers)
    assert r.status_code == 401 and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    assert KEY not in r.text


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
async def test_the_right_key_gets_the_usual_answer(
    keyed: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = await keyed.request(method, path, json=body, headers=auth)
    assert r.status_code == (404 if path == "/v1/no-such-route" else 200), r.text
    if body == COMPLETION:
        assert r.json()["choices"][0]["text"] == expected_text([ord(c) for c in "hi"], 3)
    elif body is not None and body.get("stream"):
        assert r.text.endswith("data: [DONE]\n\n")


async def test_health_and_metrics_stay_open_and_count_the_refusals(
    keyed: httpx.AsyncClient,
) -> None:
    assert (await keyed.get("/health")).status_code == 200
    await keyed.get("/v1/models")
    await keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    r = await keyed.get("/metrics")
    assert r.status_code == 200
    counts = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(r.text)
        if family.name == "tfjax_http_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert counts[("/v1/models", "401")] == 1 and counts[("/v1/models", "200")] == 1


async def test_protect_metrics_closes_metrics_only() -> None:
    app = create_app(FakeEngine(), served_model_name="fake", api_key=KEY, protect_metrics=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/metrics")).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert (await c.get("/metrics", headers=auth)).status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_no_key_means_no_check() -> None:
    app = create_app(FakeEngine(), served_model_name="fake")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/v1/models")).status_code == 200


def test_an_empty_key_is_refused() -> None:
    """An empty key (an unset shell variable) must not silently open the server."""
    with pytest.raises(ValueError, match="api_key"):
        create_app(FakeEngine(), api_key="")
