"""Hostile bodies against the two generation endpoints of a live server (real engine, TokenFlow
policy, host tier, fake runner): wrong types, huge, tiny and negative numbers, NaN and
Infinity, deep nesting, lone surrogates and other odd unicode, raw bytes. No body may get a
500, end a stream with an engine error, or take the engine down; afterwards the page books
balance and a normal request still works.

The default run is derandomized (the same examples every time, so it cannot fail by luck);
the slow run draws new examples and more of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS
from tests.reliability.harness import (
    MODEL,
    PAGE_SIZE,
    LiveServer,
    PacedRunner,
    TextTokenizer,
    expected_text,
    make_engine,
    serve,
)

PATHS = ("/v1/completions", "/v1/chat/completions")
ANSWERS = {200, 400, 404}  # a valid request, a bad one, an unknown model


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    runner = PacedRunner(num_pages=256, page_size=PAGE_SIZE, max_model_len=64)
    engine = make_engine(runner, policy="tokenflow", max_batch_size=8, host_pages=64)
    with serve(engine) as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=20) as c:
        yield c


# Any character, lone surrogates included (json.dumps escapes them as \udXXX), and a few
# strings known to trip encoders.
ODD_STRINGS = ["\ud800", "x\udfff", "\ud83d", "\x00", "\u202e", "\ufeff", "\U0001f642", "\\"]
any_text = st.sampled_from(ODD_STRINGS) | st.text(
    st.characters(codec=None, exclude_categories=()), max_size=24
)
EDGE_NUMBERS = [
    0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**400,
    1e308, -1e308, 5e-324, 1e-310, 1e-30, -0.0, 0.5, 1.5, float("nan"), float("inf"),
    float("-inf"), True, False,
]  # fmt: skip
EDGE_TABLE = [*EDGE_NUMBERS, *ODD_STRINGS, "", "1", None, [], {}, [1, "a"], {"a": [1]}, [[[[]]]]]
edge_numbers = st.sampled_from(EDGE_NUMBERS)
numbers = st.one_of(edge_numbers, edge_numbers, st.integers(), st.floats())


def containers_of(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | numbers | any_text, containers_of, max_leaves=10
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", ""]) | any_text,
        "content": any_text
        | st.none()
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text}), max_size=2),
    }
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from([MODEL, "other"]) | any_text,
    "prompt": any_text
    | st.lists(st.integers(-2, 2**32), max_size=30)
    | st.lists(any_text, max_size=3)
    | st.lists(st.lists(st.integers(0, 5), max_size=3), max_size=2),
    "messages": st.lists(message, max_size=3),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": any_text | st.lists(any_text, max_size=3),
    "stop_token_ids": st.lists(st.integers(-2, 2**33), max_size=3),
    **{
        name: numbers
        for name in (
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "priority",
            "consumption_rate",
            "n",
            "best_of",
            "top_logprobs",
            "presence_penalty",
            "frequency_penalty",
        )
    },  # fmt: skip
    **{name: st.booleans() for name in ("stream", "ignore_eos", "echo", "logprobs")},
}
plausible = st.fixed_dictionaries(
    {}, optional={name: strategy | json_values for name, strategy in FIELDS.items()}
)
# A valid request with one to three fields replaced: reaches the engine far more often.
valid = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "prompt": st.text(min_size=1, max_size=12),
        "messages": st.just([{"role": "user", "content": "hi"}]),
        "max_tokens": st.integers(1, 12),
    },
    optional={"stream": st.booleans(), "ignore_eos": st.booleans()},
)
field_value = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda name: st.tuples(st.just(name), FIELDS[name] | json_values)
)
mutated = st.builds(
    lambda body, changes: {**body, **dict(changes)},
    valid,
    st.lists(field_value, min_size=1, max_size=3),
)
raw_bodies = (
    st.binary(max_size=64)
    | st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n)
    | st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n)
    | any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
)
bodies = (
    st.one_of(mutated, mutated, mutated, plausible, json_values).map(
        lambda b: json.dumps(b).encode()
    )
    | raw_bodies
)


def check_answer(response: httpx.Response) -> None:
    assert response.status_code in ANSWERS, (response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"], error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
        events = [line for line in response.text.split("\n\n") if line.startswith("data: {")]
        assert not any('"error"' in e[:12] for e in events), response.text[-300:]
    else:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), choice


def post(http: httpx.Client, path: str, body: bytes, json_header: bool = True) -> httpx.Response:
    headers = {"content-type": "application/json"} if json_header else {}
    try:
        return http.post(path, content=body, headers=headers)
    except httpx.TransportError as err:  # the server dropped the connection: as bad as a 500
        raise AssertionError(f"no answer: {err!r}") from None


def sweep(http: httpx.Client, max_tokens: int = 4) -> list[str]:
    """Each field of a valid request replaced by each value of `EDGE_TABLE`, on both endpoints;
    returns what went wrong."""
    bases = [
        ("/v1/completions", {"prompt": "edge", "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "e"}]}),
    ]
    failures = []
    for path, base in bases:
        base = {"model": MODEL, "max_tokens": max_tokens, **base}
        for name in sorted({*FIELDS, *base}):
            for value in EDGE_TABLE:
                try:
                    check_answer(post(http, path, json.dumps({**base, name: value}).encode()))
                except AssertionError as err:
                    failures.append(f"{path} {name}={str(value)[:40]}: {str(err)[:160]}")
    return failures


FUZZ_SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=400, derandomize=True, **FUZZ_SETTINGS)
@given(path=st.sampled_from(PATHS), body=bodies, json_header=st.booleans())
def test_no_body_gets_a_500_or_hurts_the_engine(
    live: LiveServer, http: httpx.Client, path: str, body: bytes, json_header: bool
) -> None:
    check_answer(post(http, path, body, json_header))
    assert live.engine.is_healthy


@pytest.mark.slow
@settings(max_examples=3000, **FUZZ_SETTINGS)
@given(path=st.sampled_from(PATHS), body=bodies, json_header=st.booleans())
def test_no_body_gets_a_500_or_hurts_the_engine_long(
    live: LiveServer, http: httpx.Client, path: str, body: bytes, json_header: bool
) -> None:
    check_answer(post(http, path, body, json_header))
    assert live.engine.is_healthy


def test_every_field_takes_every_edge_value(live: LiveServer, http: httpx.Client) -> None:
    """A sweep rather than a search: covers the values a random search is unlikely to draw."""
    failures = sweep(http)
    assert not failures, "\n".join(failures[:30])
    assert live.engine.is_healthy


def test_stop_lists_are_capped(http: httpx.Client) -> None:
    """Stop strings are matched on the engine thread after every token: a list of thousands
    (~50 ms per token for 1,000 strings of 100 characters) would slow every stream."""
    base = {"model": MODEL, "prompt": "stops", "max_tokens": 4}
    at_cap = [f"{i:03d}" + "s" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOP_STRINGS)]
    assert http.post("/v1/completions", json={**base, "stop": at_cap}).status_code == 200
    for stop in (at_cap + ["one more"], ["s" * (MAX_STOP_CHARS + 1)], ["s"] * 1000):
        answer = http.post("/v1/completions", json={**base, "stop": stop})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stop"


def test_after_fuzzing_books_balance_and_a_normal_request_works(
    live: LiveServer, http: httpx.Client
) -> None:
    assert http.get("/health?deep=1").json() == {"status": "ok"}
    body = {"model": MODEL, "prompt": "still here", "max_tokens": 8, "ignore_eos": True}
    answer = http.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == expected_text(TextTokenizer(), "still here", 8)
    stats = live.engine.stats()
    assert (stats.device_pages_used, stats.host_pages_used) == (0, 0)
