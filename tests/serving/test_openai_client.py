"""The official `openai` client against the app (in process): it parses our responses and
chunks, sends our extensions through `extra_body`, and maps our errors to its exceptions."""

from __future__ import annotations

import openai
import pytest

from tests.serving.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tfjax.api import QueueFullError

pytestmark = pytest.mark.anyio
TOK = FakeTokenizer()
MESSAGES = [{"role": "user", "content": "hi"}]


async def test_chat_stream_with_usage(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    stream = await oai.chat.completions.create(
        model="fake",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"consumption_rate": 30, "priority": 2, "ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(TOK.encode(TOK.apply_chat_template(MESSAGES)), 4)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    (sub,) = engine.submitted
    assert (sub.consumption_rate, sub.priority, sub.sampling.ignore_eos) == (30, 2, True)


async def test_completion(oai: openai.AsyncOpenAI) -> None:
    result = await oai.completions.create(model="fake", prompt="hi", max_tokens=3, seed=7)
    assert result.choices[0].text == expected_text(TOK.encode("hi"), 3)
    assert result.usage.total_tokens == 5


async def test_errors_map_to_client_exceptions(oai: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    with pytest.raises(openai.BadRequestError):
        await oai.completions.create(model="fake", prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="gpt-4", prompt="hi")
    engine.raise_on_submit = QueueFullError("full")
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model="fake", messages=MESSAGES, stream=True)


async def test_models(oai: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in oai.models.list()] == ["fake"]
