"""logprobs in OpenAI's shapes, streamed and not, on both endpoints: every token of the fake
engine carries `fake_logprob`, so each field can be checked exactly; the official client
parses them."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serving.conftest import sse_events
from tests.serving.fake_engine import FakeEngine, FakeTokenizer, expected_text

pytestmark = pytest.mark.anyio
TOK = FakeTokenizer()
MESSAGES = [{"role": "user", "content": "hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"


def chat_entry(char: str, k: int, num_top: int) -> dict:
    """What `fake_logprob(ord(char), k, num_top)` renders as in a chat `content` list."""

    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = [entry(chr(ord(char) + j), -k / 4 - j) for j in range(num_top)]
    return {**entry(char, -k / 4), "top_logprobs": top}


async def test_chat_logprobs_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
    r = await client.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    text = expected_text(engine.submitted[0].prompt_ids, 4)
    assert engine.submitted[0].sampling.logprobs == 3
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs == {
        "content": [chat_entry(c, k + 1, 3) for k, c in enumerate(text)],
        "refusal": None,
    }


async def test_chat_logprobs_streamed_with_their_tokens(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "stream": True}
    r = await client.post(CHAT, json=body)
    chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
    text = expected_text(engine.submitted[0].prompt_ids, 3)
    with_tokens = [c["choices"][0] for c in chunks if c["choices"][0]["logprobs"]]
    assert [c["delta"]["content"] for c in with_tokens] == list(text)
    content = [e for c in with_tokens for e in c["logprobs"]["content"]]
    assert content == [chat_entry(c, k + 1, 0) for k, c in enumerate(text)]


async def test_chat_without_logprobs_has_none(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2})
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("stream", [False, True])
async def test_completion_logprobs(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    r = await client.post(
        C, json={"prompt": "hi", "max_tokens": 4, "logprobs": 2, "stream": stream}
    )
    text = expected_text(TOK.encode("hi"), 4)
    if stream:
        chunks = [e["choices"][0]["logprobs"] for e in sse_events(r.text) if e != "[DONE]"]
        parts = [c for c in chunks if c]
        logprobs = {key: [v for c in parts for v in c[key]] for key in parts[0]}
    else:
        logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs == {
        "tokens": list(text),
        "token_logprobs": [-(k + 1) / 4 for k in range(4)],
        "top_logprobs": [
            {c: -(k + 1) / 4, chr(ord(c) + 1): -(k + 1) / 4 - 1} for k, c in enumerate(text)
        ],
        "text_offset": [0, 1, 2, 3],
    }


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"logprobs": 1}, "logprobs"),
        (C, {"logprobs": 6}, "logprobs"),
        (C, {"logprobs": True}, "logprobs"),
        (C, {"top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_bad_logprobs(client: httpx.AsyncClient, path: str, extra: dict, param: str) -> None:
    base = {"messages": MESSAGES} if path == CHAT else {"prompt": "hi"}
    r = await client.post(path, json={**base, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


async def test_the_openai_client_reads_logprobs(oai: openai.AsyncOpenAI) -> None:
    result = await oai.chat.completions.create(
        model="fake", messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=2
    )
    content = result.choices[0].logprobs.content
    assert [c.logprob for c in content] == [-0.25, -0.5]
    assert [len(c.top_logprobs) for c in content] == [2, 2]
    legacy = await oai.completions.create(model="fake", prompt="hi", max_tokens=2, logprobs=1)
    assert legacy.choices[0].logprobs.token_logprobs == [-0.25, -0.5]
