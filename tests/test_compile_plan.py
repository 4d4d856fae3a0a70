"""The bucket-fallback choice: a step whose bucket is not compiled maps to compiled buckets
that hold its tiles and rows, at the least cost a brute-force search finds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tfjax.compile_plan import (
    CALL_OVERHEAD_TOKENS,
    COMPILE_COST_CALLS,
    NO_ROW,
    PaddingLedger,
    background_order,
    calls_for,
    merge_rows,
    split_step,
    startup_buckets,
)
from tfjax.config import Bucket, EngineConfig
from tfjax.kv.manager import PrefillWork
from tfjax.request import Request, SamplingParams


def holds(calls: tuple[Bucket, ...], tiles: int, rows: int) -> bool:
    return sum(b.tiles for b in calls) >= tiles and sum(b.rows for b in calls) >= rows


def brute_force_cost(tiles: int, rows: int, compiled: frozenset[Bucket], most_calls: int) -> int:
    """The least cost over every multiset of up to `most_calls` compiled buckets holding the
    step."""
    best = None
    for n in range(1, most_calls + 1):
        for calls in itertools.combinations_with_replacement(sorted(compiled, key=str), n):
            if holds(calls, tiles, rows):
                cost = sum(b.num_tokens + CALL_OVERHEAD_TOKENS for b in calls)
                best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def test_a_compiled_bucket_that_holds_the_step_is_used_alone() -> None:
    compiled = frozenset({Bucket(0, 8), Bucket(4, 8)})
    assert calls_for(0, 1, compiled) == (Bucket(0, 8),)
    assert calls_for(0, 8, compiled) == (Bucket(0, 8),)
    assert calls_for(3, 5, compiled) == (Bucket(4, 8),)
    assert calls_for(1, 0, compiled) == (Bucket(4, 8),)  # pad decode rows are cheap


def test_a_step_larger_than_every_compiled_bucket_is_split() -> None:
    compiled = frozenset({Bucket(0, 8), Bucket(4, 8)})
    calls = calls_for(10, 20, compiled)
    assert holds(calls, 10, 20)
    assert calls == (Bucket(4, 8), Bucket(4, 8), Bucket(4, 8))
    assert calls_for(0, 32, compiled) == (Bucket(0, 8),) * 4


def test_splitting_wins_over_padding_to_a_much_larger_bucket() -> None:
    compiled = frozenset({Bucket(1, 0), Bucket(47, 32)})
    assert calls_for(2, 0, compiled) == (Bucket(1, 0), Bucket(1, 0))
    assert calls_for(40, 0, compiled) == (Bucket(47, 32),)


@pytest.mark.parametrize(
    "compiled",
    [
        {Bucket(0, 8), Bucket(4, 8)},
        {Bucket(0, 1), Bucket(1, 0)},
        {Bucket(0, 2), Bucket(0, 8), Bucket(1, 0), Bucket(4, 0), Bucket(4, 8)},
        {Bucket(1, 8), Bucket(16, 0), Bucket(0, 32)},
    ],
)
def test_the_choice_costs_what_a_brute_force_search_finds(compiled: set[Bucket]) -> None:
    compiled_set = frozenset(compiled)
    for tiles, rows in itertools.product(range(0, 9), range(0, 10)):
        if not tiles and not rows:
            continue
        calls = calls_for(tiles, rows, compiled_set)
        assert set(calls) <= compiled_set
        assert holds(calls, tiles, rows), (tiles, rows, calls)
        cost = sum(b.num_tokens + CALL_OVERHEAD_TOKENS for b in calls)
        # Nothing cheaper with as many calls or one more (all multisets of them are tried).
        assert cost == brute_force_cost(tiles, rows, compiled_set, len(calls) + 1)


def test_no_compiled_bucket_with_tiles_cannot_run_a_prefill() -> None:
    with pytest.raises(ValueError, match="no compiled buckets"):
        calls_for(1, 0, frozenset({Bucket(0, 8)}))


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(),
        EngineConfig(max_batch_size=4, prefill_token_budget=32, page_size=8),
        EngineConfig(max_batch_size=1, prefill_token_budget=16),
    ],
)
def test_the_startup_buckets_run_every_step_shape_in_one_call(config: EngineConfig) -> None:
    first = startup_buckets(config)
    assert len(set(first)) == 3 and set(first) <= set(config.step_buckets())
    for bucket in config.step_buckets():
        calls = calls_for(bucket.tiles, bucket.rows, frozenset(first))
        assert len(calls) == 1 and holds(calls, bucket.tiles, bucket.rows)
    # A burst's steps run unpadded: full prefill chunks alone (admitting its prompts), then
    # a full batch decoding.
    tiles, rows = config.prefill_tile_buckets()[-1], config.decode_batch_buckets()[-1]
    assert calls_for(tiles, 0, frozenset(first)) == (Bucket(tiles, 0),)
    assert calls_for(0, rows, frozenset(first)) == (Bucket(0, rows),)


def test_a_bucket_is_worth_compiling_once_its_steps_padded_more_than_a_compile_costs() -> None:
    ledger = PaddingLedger()
    # One decode row padded to 32: 31 tokens wasted a step, against 16 calls of 32 tokens.
    lone, full = Bucket(0, 1), Bucket(0, 32)
    steps = [ledger.record(lone, [full]) for _ in range(COMPILE_COST_CALLS + 1)]
    assert steps == [False] * COMPILE_COST_CALLS + [True]  # 17 * 31 = 527 >= 512
    # A prefill chunk beside 8 rows, padded to 32 rows: 4 % waste, not worth a compile.
    mixed, largest = Bucket(16, 8), Bucket(16, 32)
    assert not any(ledger.record(mixed, [largest]) for _ in range(300))
    # A split costs a whole call more (the weights read again): worth it at once.
    assert ledger.record(Bucket(0, 2), [lone, lone])


def test_the_background_order_is_the_rest_smallest_first() -> None:
    config = EngineConfig()
    first = startup_buckets(config)
    rest = background_order(config.step_buckets(), first)
    assert set(rest) == set(config.step_buckets()) - set(first)
    assert [b.num_tokens for b in rest] == sorted(b.num_tokens for b in rest)


def test_a_split_step_runs_each_chunk_in_order_and_merges_back_to_its_rows() -> None:
    def request(name: str, computed: int) -> Request:
        r = Request(name, list(range(200)), SamplingParams(), arrival_s=0.0, consumption_rate=1)
        r.num_computed_tokens = computed
        return r

    a, b = request("a", 5), request("b", 0)
    rows = [request(f"d{i}", 200) for i in range(3)]
    calls = split_step([PrefillWork(a, 70), PrefillWork(b, 10)], rows, [Bucket(2, 2)] * 2)
    # a's 70 tokens: 64 (two tiles, mid-chunk: no row) in the first call, 6 in the second.
    assert [(c.request.request_id, c.start, c.num_tokens) for c in calls[0].chunks] == [
        ("a", 5, 64)
    ]
    assert [(c.request.request_id, c.start, c.num_tokens) for c in calls[1].chunks] == [
        ("a", 69, 6),
        ("b", 0, 10),
    ]
    assert [r.request_id for c in calls for r in c.decode] == ["d0", "d1", "d2"]
    assert calls[0].targets.tolist() == [NO_ROW, 2, 3]
    assert calls[1].targets.tolist() == [0, 1, 4]
    # Each call answers [pieces..., rows..., padding...]; the step's rows come back in order.
    parts = [np.array([-1, 12, 13, 99]), np.array([10, 11, 14, 99])]
    assert merge_rows(calls, parts, 5).tolist() == [10, 11, 12, 13, 14]
