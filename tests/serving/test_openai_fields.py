"""Every field of OpenAI's chat and completions request bodies is honoured or refused, never
silently ignored: the field lists come from the installed openai client's own request types,
so a field OpenAI adds makes this test fail until the server decides what to do with it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from serving import protocol as p
from tests.serving.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

C, CHAT = "/v1/completions", "/v1/chat/completions"
BASE = {
    C: {"prompt": "hi", "max_tokens": 2},
    CHAT: {"messages": [{"role": "user", "content": "hi"}]},
}
# `stream` lives in the streaming/non-streaming subclasses, not in the shared base.
OPENAI_FIELDS = {
    C: set(completion_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"},
    CHAT: set(chat_create_params.CompletionCreateParamsBase.__annotations__) | {"stream"},
}
NOT_OFF = {"unsupported": True}  # a value no refused field takes to mean "off"


def test_every_openai_field_is_classified() -> None:
    classified = p.HONOURED_FIELDS | set(p.REFUSED_UNLESS)
    assert OPENAI_FIELDS[C] - classified == set()
    assert OPENAI_FIELDS[CHAT] - classified == set()
    assert p.HONOURED_FIELDS.isdisjoint(p.REFUSED_UNLESS)


@pytest.mark.parametrize("path", [C, CHAT])
@pytest.mark.parametrize("name", sorted(p.REFUSED_UNLESS))
async def test_a_refused_field_is_a_400_naming_it(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, name: str
) -> None:
    r = await client.post(path, json={**BASE[path], name: NOT_OFF})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == name
    assert engine.submitted == []


@pytest.mark.parametrize("path", [C, CHAT])
@pytest.mark.parametrize(
    ("name", "off"), [(n, v) for n, values in p.REFUSED_UNLESS.items() for v in (None, *values)]
)
async def test_a_refused_field_set_to_off_is_accepted(
    client: httpx.AsyncClient, path: str, name: str, off: Any
) -> None:
    r = await client.post(path, json={**BASE[path], "max_tokens": 2, name: off})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("user", "u-1"),
        ("metadata", {"team": "a"}),
        ("safety_identifier", "hash"),
        ("prompt_cache_key", "k"),
    ],
)
async def test_informational_fields_are_accepted_and_typed(
    client: httpx.AsyncClient, name: str, value: Any
) -> None:
    ok = await client.post(CHAT, json={**BASE[CHAT], "max_tokens": 2, name: value})
    assert ok.status_code == 200, ok.text
    bad = await client.post(CHAT, json={**BASE[CHAT], name: 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == name


async def test_fields_no_api_defines_are_ignored(client: httpx.AsyncClient) -> None:
    r = await client.post(C, json={**BASE[C], "x_client_trace": "abc"})
    assert r.status_code == 200
