"""`n` choices: each is an engine request with seed + i, later ones queued once the first has
its prompt prefilled (so they hit the prefix cache); streamed with their `index`, collected into
`choices` in index order, usage summed over choices with the prompt counted once."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serving.conftest import sse_events
from tests.serving.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tfjax.api import QueueFullError

pytestmark = pytest.mark.anyio
TOK = FakeTokenizer()
MESSAGES = [{"role": "user", "content": "hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"


async def test_completion_choices(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(C, json={"prompt": "hi", "max_tokens": 3, "n": 3, "seed": 2**32 - 2})
    body = r.json()
    text = expected_text(TOK.encode("hi"), 3)
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (i, text, "length") for i in range(3)
    ]
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 9
    assert [s.sampling.seed for s in engine.submitted] == [2**32 - 2, 2**32 - 1, 0]
    assert len({s.request_id for s in engine.submitted}) == 3


async def test_chat_choices_streamed_with_their_index(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "n": 2, "stream": True}
    r = await client.post(CHAT, json={**body, "stream_options": {"include_usage": True}})
    events = [e for e in sse_events(r.text) if e != "[DONE]"]
    text = expected_text(engine.submitted[0].prompt_ids, 2)
    for index in (0, 1):
        mine = [
            e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == index
        ]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == text
        assert [c["finish_reason"] for c in mine][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert engine.aborted == []


async def test_later_choices_wait_for_the_first_token(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    """While choice 0 has produced nothing, it is the only request queued."""
    engine.first_token_delay_s = 0.2
    task = asyncio.ensure_future(client.post(C, json={"prompt": "hi", "max_tokens": 2, "n": 4}))
    await asyncio.sleep(0.1)
    assert len(engine.submitted) == 1
    r = await task
    assert len(r.json()["choices"]) == 4 and len(engine.submitted) == 4


async def test_a_refused_later_choice_fails_the_request(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    submit = engine.submit

    def first_only(*args, **kwargs):
        if engine.submitted:
            raise QueueFullError("full")
        return submit(*args, **kwargs)

    engine.submit = first_only
    r = await client.post(C, json={"prompt": "hi", "max_tokens": 2, "n": 2})
    assert r.status_code == 503 and "Choice 1" in r.json()["error"]["message"]
