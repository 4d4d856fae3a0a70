"""`best_of` on completions: best_of sequences run (choice i seeded with seed + i, as `n`), and
the n with the highest cumulative logprob are answered, likeliest first; the same request with
`n = best_of` and logprobs is the reference. Refused on chat, when streamed, or below n."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.serving.tiny_engine import tiny_async_engine
from tfjax.async_engine import AsyncEngine

pytestmark = pytest.mark.anyio

C = "/v1/completions"
BODY = {"prompt": "the quick brown fox", "max_tokens": 6, "temperature": 1.0, "seed": 3}


@pytest.fixture(scope="module")
def served(tiny_qwen2_engine_parts) -> Iterator[AsyncEngine]:
    yield from tiny_async_engine(tiny_qwen2_engine_parts)


async def test_best_of_answers_the_likeliest_sequences(http: httpx.AsyncClient) -> None:
    every = await http.post(C, json={**BODY, "n": 4, "logprobs": 0})
    assert every.status_code == 200, every.text
    scored = [(sum(c["logprobs"]["token_logprobs"]), c["text"]) for c in every.json()["choices"]]
    assert len({text for _, text in scored}) > 1, "seeded choices should differ"
    best = await http.post(C, json={**BODY, "n": 2, "best_of": 4})
    assert best.status_code == 200, best.text
    reply = best.json()
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert [c["text"] for c in reply["choices"]] == [t for _, t in sorted(scored, reverse=True)][:2]
    assert all(c["logprobs"] is None for c in reply["choices"])  # not asked for
    assert reply["usage"]["completion_tokens"] == every.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/chat/completions", {"best_of": 2}),
        (C, {"best_of": 2, "stream": True}),
        (C, {"best_of": 1, "n": 2}),
        (C, {"best_of": True}),
    ],
)
async def test_bad_best_of_is_a_400(client: httpx.AsyncClient, path: str, extra: dict) -> None:
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = await client.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "best_of"
