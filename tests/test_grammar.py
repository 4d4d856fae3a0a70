"""Structured outputs through the engine on a random-weight Qwen2 and its real byte-level BPE
tokenizer (`tests/conftest.py`): random JSON schemas sampled at temperature 1 always give JSON
that validates (unless cut by max_tokens), a constrained row leaves its unconstrained neighbours'
tokens alone, preemption by recompute and by swap keeps a constrained request's tokens, no
compile after warm-up and no page leak."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.tokenizer import Tokenizer
from tests.fakes import drive
from tests.kv.test_offload import StormPolicy
from tests.test_engine import Recorder
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.grammar import Grammar, GrammarTokenizer
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.metrics import COMPILES
from tfjax.request import FinishReason, Request, SamplingParams
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy

WORDS = ["fox", "dog", "the quick", "lazy", 'say "hi"']
KEYS = ["a", "name", "items", "n", "ok"]


@pytest.fixture(scope="module")
def model(tiny_qwen2_engine_parts) -> tuple[Runner, EngineConfig, Tokenizer, GrammarTokenizer]:
    runner, config, tokenizer = tiny_qwen2_engine_parts
    return runner, config, tokenizer, GrammarTokenizer(tokenizer)


def make_engine(model, *, num_pages: int = 128, policy=None, offload: bool = False):
    runner, config, tokenizer, _ = model
    io = None
    if offload:
        transfers = Transfers(runner.pages_sharding, max_bytes_in_flight=1 << 24)
        io = Offload(host=HostTier(256, config.page_size), transfers=transfers, io=runner)
    config = dataclasses.replace(config, num_pages=num_pages)
    rec = Recorder()
    policy = policy or FcfsPolicy(chunked=True)
    return Engine(runner, tokenizer, config, policy, emit=rec, offload=io), rec


def requests(
    tokenizer: Tokenizer, n: int, grammar: Grammar | None, *, first: int = 0, max_tokens: int = 48
) -> list[Request]:
    out = []
    for i in range(first, first + n):
        prompt = tokenizer.encode(f"the quick brown fox {i} jumps over")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=100 + i, grammar=grammar
        )
        out.append(Request(f"r{i}", prompt, params, arrival_s=float(i), consumption_rate=10.0))
    return out


def text(tokenizer: Tokenizer, rec: Recorder, request_id: str) -> str:
    return tokenizer.decode(rec.tokens(request_id))


def _object(props: dict[str, dict], required: list[bool]) -> dict:
    names = list(props)
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    return {**schema, "required": [k for k, r in zip(names, required, strict=False) if r]}


_LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(
        lambda low, span: {"type": "integer", "minimum": low, "maximum": low + span},
        st.integers(-50, 50),
        st.integers(0, 200),
    ),
    st.just({"type": "number", "minimum": -1.5, "maximum": 2.5}),
    st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}
    ),
    st.integers(0, 4).map(lambda n: {"type": "string", "maxLength": n}),
)
_SCHEMAS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.builds(
            lambda items, most: {"type": "array", "items": items, "maxItems": most},
            inner,
            st.integers(0, 3),
        ),
        st.builds(
            _object,
            st.dictionaries(st.sampled_from(KEYS), inner, min_size=1, max_size=3),
            st.lists(st.booleans(), min_size=3, max_size=3),
        ),
    ),
    max_leaves=4,
)


def test_random_schemas_give_valid_json_at_temperature_one(model) -> None:
    """Every output that ends with "stop" parses and validates against its schema; outputs
    cut by max_tokens say "length". Each example runs four seeded requests in one batch."""
    _, _, tokenizer, grammars = model
    finishes = []

    @settings(
        max_examples=8,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(schema=_SCHEMAS)
    def check(schema: dict) -> None:
        engine, rec = make_engine(model)
        batch = requests(tokenizer, 4, grammars.json_schema(schema), max_tokens=64)
        drive(engine, batch)
        assert engine.kv.num_used_pages == 0
        for r in batch:
            finishes.append(rec.finish(r.request_id))
            if finishes[-1] is FinishReason.STOP:
                jsonschema.validate(json.loads(text(tokenizer, rec, r.request_id)), schema)
            else:
                assert finishes[-1] is FinishReason.LENGTH

    compiles = COMPILES.count
    check()
    assert COMPILES.count == compiles, "compiled while serving"
    assert finishes.count(FinishReason.STOP) >= len(finishes) // 2, finishes


def test_a_constrained_row_leaves_its_neighbours_tokens_alone(model) -> None:
    _, _, tokenizer, grammars = model
    alone, alone_rec = make_engine(model)
    drive(alone, requests(tokenizer, 4, None))
    mixed, mixed_rec = make_engine(model)
    grammar = grammars.json_schema({"type": "array", "items": {"enum": WORDS}})
    batch = requests(tokenizer, 4, None)
    batch[1:1] = requests(tokenizer, 2, grammar, first=10)
    drive(mixed, batch)
    for r in requests(tokenizer, 4, None):
        assert mixed_rec.tokens(r.request_id) == alone_rec.tokens(r.request_id)
    for i in (10, 11):
        value = json.loads(text(tokenizer, mixed_rec, f"r{i}"))
        assert set(value) <= set(WORDS)


@pytest.mark.parametrize("how", ["recompute", "swap"])
def test_preemption_keeps_a_constrained_requests_tokens(model, how: str) -> None:
    """A tight pool (recompute) or a preempt-and-load storm (swap) gives the tokens of a calm
    run: the matcher follows the output tokens, which preemption never drops."""
    _, _, tokenizer, grammars = model
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    grammar = grammars.json_schema(schema)
    calm, calm_rec = make_engine(model)
    drive(calm, requests(tokenizer, 6, grammar, max_tokens=40))
    if how == "recompute":
        busy, busy_rec = make_engine(model, num_pages=12)
    else:
        busy, busy_rec = make_engine(model, policy=StormPolicy(3, 0.2, 0.6), offload=True)
    drive(busy, requests(tokenizer, 6, grammar, max_tokens=40))
    stats = busy.kv.stats
    assert (stats.num_preemptions if how == "recompute" else stats.num_loads) > 0
    for r in requests(tokenizer, 6, grammar):
        assert busy_rec.tokens(r.request_id) == calm_rec.tokens(r.request_id)
        if busy_rec.finish(r.request_id) is FinishReason.STOP:
            jsonschema.validate(json.loads(text(tokenizer, busy_rec, r.request_id)), schema)


def test_regex_and_choice_grammars(model) -> None:
    _, _, tokenizer, grammars = model
    engine, rec = make_engine(model)
    choices = ["yes", "no", 'a "quoted" fox']
    batch = requests(tokenizer, 3, grammars.choice(choices))
    batch += requests(tokenizer, 3, grammars.regex(r"[a-c]{2,4}-[0-9]"), first=3)
    drive(engine, batch)
    for r in batch[:3]:
        assert text(tokenizer, rec, r.request_id) in choices
        assert rec.finish(r.request_id) is FinishReason.STOP
    for r in batch[3:]:
        assert rec.finish(r.request_id) is FinishReason.STOP
        assert re.fullmatch(r"[a-c]{2,4}-[0-9]", text(tokenizer, rec, r.request_id))


def accepts(grammar: Grammar, tokenizer: Tokenizer, text: str) -> bool:
    """Whether `grammar` lets `text`'s tokens through, one by one (the mask decides)."""
    matcher = grammar.matcher()
    mask = np.zeros(grammar.tokenizer.num_mask_words, np.int32)
    for token in tokenizer.encode(text):
        matcher.fill_bitmask(mask)
        if not (int(mask[token // 32]) >> (token % 32)) & 1:
            return False
        matcher.advance(token)
    return True


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (r"\d\d", "42", "\u096e\u096e"),  # Devanagari digits are Unicode \d, not ASCII
        (r"[a\d]+", "a7a", "a\u096e"),  # inside a class too
        (r"\w+", "ab_9", "\u00e9t\u00e9"),
        (r"\D", "x", "7"),
        (r"\\d", "\\d", "7"),  # an escaped backslash then a literal d
    ],
)
def test_regex_classes_are_ascii(model, pattern: str, good: str, bad: str) -> None:
    _, _, tokenizer, grammars = model
    grammar = grammars.regex(pattern)
    assert accepts(grammar, tokenizer, good)
    assert not accepts(grammar, tokenizer, bad)


def test_a_schema_that_cannot_compile_is_a_value_error_naming_it(model) -> None:
    *_, grammars = model
    with pytest.raises(ValueError, match="foo"):
        grammars.json_schema({"type": "foo"})
    with pytest.raises(ValueError, match="regex"):
        grammars.regex("(unclosed")
