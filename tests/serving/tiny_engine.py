"""A real `AsyncEngine` on the tiny random Qwen2 (`tiny_qwen2_engine_parts`), served by the app
in-process, for the tests that need real sampling, grammars and logprobs over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai

from serving.app import create_app
from tfjax.async_engine import AsyncEngine
from tfjax.engine import Engine
from tfjax.sched.fcfs import FcfsPolicy


def tiny_async_engine(parts: tuple[Any, Any, Any], tokenizer: Any = None) -> Iterator[AsyncEngine]:
    """The engine thread on the shared warmed runner; `tokenizer` replaces the model's (e.g.
    with another chat template). Shut down when the generator closes."""
    runner, config, model_tokenizer = parts
    tokenizer = tokenizer or model_tokenizer
    engine = AsyncEngine(
        lambda emit: Engine(runner, tokenizer, config, FcfsPolicy(chunked=True), emit=emit),
        model_name="tiny",
        tokenizer=tokenizer,
        max_waiting=64,
    )
    yield engine
    engine.shutdown()


async def app_client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app; afterwards the engine is idle with every page free."""
    transport = httpx.ASGITransport(app=create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    assert await engine.check_invariants() is None
    assert engine.engine.kv.num_used_pages == 0


def openai_client(http: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0
    )
