"""Reader model: hand-computed timelines and a brute-force check of the O(1) buffer query."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfjax.buffers import Reader


def read_times(rate: float, gen: list[float]) -> list[float]:
    """c_1 = g_1, c_j = max(c_{j-1} + 1/r, g_j), straight from docs/definitions.md."""
    c: list[float] = []
    for g in gen:
        c.append(g if not c else max(c[-1] + 1.0 / rate, g))
    return c


def test_rejects_non_positive_rate() -> None:
    for rate in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError):
            Reader(rate)


def test_hand_computed_timeline() -> None:
    # rate 10: tokens at 1.0, 1.0, 1.0, 1.5, 2.0 are read at 1.0, 1.1, 1.2, 1.5, 2.0.
    reader = Reader(10.0)
    for g in (1.0, 1.0, 1.0, 1.5, 2.0):
        reader.on_token(g)
    assert reader.first_token_s == 1.0
    assert reader.buffers == [0, 0, 1, 0, 0]
    assert reader.stall_s == pytest.approx(0.2 + 0.4)
    assert reader.last_read_s == 2.0
    assert reader.num_tokens == 5


def test_buffer_queries() -> None:
    reader = Reader(4.0)  # one token every 0.25 s
    assert reader.buffer_tokens(0.0) == 0
    assert reader.buffer_s(0.0) == 0.0  # no first token yet: most urgent
    assert reader.stall_until_s(5.0) == 0.0
    for _ in range(5):
        reader.on_token(1.0)  # read at 1.0, 1.25, 1.5, 1.75, 2.0
    assert reader.buffer_tokens(1.0) == 4
    assert reader.buffer_tokens(1.1) == 4
    assert reader.buffer_tokens(1.25) == 3  # token 2 read exactly now
    assert reader.buffer_tokens(1.9) == 1
    assert reader.buffer_tokens(2.0) == 0
    assert reader.buffer_s(1.0) == pytest.approx(1.25)  # next token wanted at 2.25
    assert reader.buffer_s(3.0) == 0.0
    assert reader.stall_until_s(3.0) == pytest.approx(0.75)  # stalling since 2.25
    assert reader.stall_s == 0.0


def test_one_token_output() -> None:
    reader = Reader(1.0)
    reader.on_token(3.0)
    assert reader.buffers == [0]
    assert reader.stall_s == 0.0
    assert reader.buffer_tokens(3.0) == 0


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 20.0]),
    gaps_ms=st.lists(st.integers(0, 700), min_size=1, max_size=60),
    probe_ms=st.integers(0, 3000),
)
def test_matches_brute_force(rate: float, gaps_ms: list[int], probe_ms: int) -> None:
    gen: list[float] = []
    t = 0.0
    for gap in gaps_ms:
        t += gap / 1000.0
        gen.append(t)
    reader = Reader(rate)
    for g in gen:
        reader.on_token(g)
    c = read_times(rate, gen)
    # B_j: earlier tokens unread when token j arrives.
    expected_buffers = [sum(1 for k in range(j) if c[k] > gen[j] + 1e-9) for j in range(len(gen))]
    assert reader.buffers == expected_buffers
    expected_stall = sum(max(0.0, gen[j] - (c[j - 1] + 1 / rate)) for j in range(1, len(gen)))
    assert reader.stall_s == pytest.approx(expected_stall, abs=1e-9)
    now = gen[-1] + probe_ms / 1000.0 + 1e-4  # off the read-time grid: no exact ties
    assert reader.buffer_tokens(now) == sum(1 for ck in c if ck > now)
    assert reader.buffer_s(now) == pytest.approx(max(0.0, c[-1] + 1 / rate - now))
