"""Structured outputs over HTTP: the app on a real `AsyncEngine` running the tiny random Qwen2
with its byte-level BPE tokenizer. `response_format` (json_object, json_schema) and vLLM's
`guided_json` / `guided_regex` / `guided_choice` on both endpoints, streamed and not, read by
the official `openai` client; malformed or uncompilable constraints are 400s in OpenAI's shape
naming the field, and nothing leaks pages."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.serving.tiny_engine import tiny_async_engine
from tfjax.async_engine import AsyncEngine

pytestmark = pytest.mark.anyio

C, CHAT = "/v1/completions", "/v1/chat/completions"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["fox", "dog"]}, "maxItems": 3},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def served(tiny_qwen2_engine_parts) -> Iterator[AsyncEngine]:
    yield from tiny_async_engine(tiny_qwen2_engine_parts)


def body(path: str, **extra: Any) -> dict[str, Any]:
    prompt = (
        {"messages": [{"role": "user", "content": "the quick brown fox"}]}
        if path == CHAT
        else {"prompt": "the quick brown fox"}
    )
    return {**prompt, "max_tokens": 60, "temperature": 1.0, **extra}


def check_json(text: str, finish: str, schema: dict[str, Any]) -> None:
    assert finish in ("stop", "length")
    if finish == "stop":
        jsonschema.validate(json.loads(text), schema)


async def test_openai_client_gets_schema_valid_json_in_every_choice(served_oai: openai.AsyncOpenAI):
    reply = await served_oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a pet as JSON"}],
        response_format=RESPONSE_FORMAT,
        max_tokens=60,
        n=3,
        seed=5,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        check_json(choice.message.content, choice.finish_reason, SCHEMA)
    assert any(c.finish_reason == "stop" for c in reply.choices)


async def test_mask_time_is_reported_on_metrics(http: httpx.AsyncClient) -> None:
    r = await http.post(C, json=body(C, guided_regex="[a-z]{3}"))
    assert r.status_code == 200, r.text
    metrics = (await http.get("/metrics")).text
    seconds = re.search(r'tfjax_engine_extra\{name="grammar_mask_seconds_total"\} (\S+)', metrics)
    steps = re.search(r'tfjax_engine_extra\{name="grammar_masked_steps"\} (\S+)', metrics)
    assert seconds and float(seconds[1]) > 0 and steps and float(steps[1]) >= 3, metrics


async def test_json_object_streamed_on_both_endpoints(http: httpx.AsyncClient) -> None:
    for path in (C, CHAT):
        for seed in range(3):
            extra = {"response_format": {"type": "json_object"}, "stream": True, "seed": seed}
            r = await http.post(path, json=body(path, **extra))
            assert r.status_code == 200, r.text
            chunks = [
                json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")
            ]
            choices = [c["choices"][0] for c in chunks]
            text = "".join(
                (c["delta"].get("content") or "") if path == CHAT else c["text"] for c in choices
            )
            check_json(text, choices[-1]["finish_reason"], {"type": "object"})


@pytest.mark.parametrize("path", [C, CHAT])
async def test_vllm_guided_options(http: httpx.AsyncClient, path: str) -> None:
    def text(r: httpx.Response) -> tuple[str, str]:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        content = choice["message"]["content"] if path == CHAT else choice["text"]
        return content, choice["finish_reason"]

    options = ["yes", "no", "maybe so"]
    assert text(await http.post(path, json=body(path, guided_choice=options)))[0] in options
    out, finish = text(await http.post(path, json=body(path, guided_regex=r"[a-c]{3}-\d\d")))
    assert re.fullmatch(r"[a-c]{3}-\d\d", out) and finish == "stop"
    out, finish = text(await http.post(path, json=body(path, guided_json=json.dumps(SCHEMA))))
    check_json(out, finish, SCHEMA)


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "wat"}}}}, "response_format", "wat"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         "response_format", "name"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "list"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "Only one"),
    ],
)  # fmt: skip
async def test_bad_constraints_are_400s_naming_the_field(
    http: httpx.AsyncClient, extra: dict, param: str, says: str
) -> None:
    for path in (C, CHAT):
        r = await http.post(path, json=body(path, **extra))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert says in error["message"]


async def test_a_tokenizer_without_a_backend_refuses_constraints(client: httpx.AsyncClient) -> None:
    """The fake engine's character tokenizer cannot drive llguidance: 400, nothing queued."""
    r = await client.post(
        CHAT, json=body(CHAT, response_format={"type": "json_object"}, max_tokens=2)
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    ok = await client.post(CHAT, json=body(CHAT, response_format={"type": "text"}, max_tokens=2))
    assert ok.status_code == 200, ok.text
