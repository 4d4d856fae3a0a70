"""Prefix cache: shared full pages by hash chain, reference counts, evictable LRU, exact outputs.

On the fake runner a page shared with the wrong request, reused after it was overwritten or
released while someone still reads it changes the tokens, so every engine test compares with
`reference_tokens`, and the books (`check_idle`: reference counts against page tables, both
tiers) are checked after every step.
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import IDLE_STEP_S, FakeRunner, FakeTokenizer, reference_tokens
from tests.kv.test_offload import StormPolicy, make_offload_engine
from tests.test_engine import Recorder
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.prefix import PrefixCache
from tfjax.request import Request, SamplingParams
from tfjax.sched.fcfs import FcfsPolicy

PAGE_SIZE = 4


def chat_request(i: int, stem: list[int], own_len: int, max_tokens: int) -> Request:
    rng = random.Random(1000 + i)
    prompt = [*stem, *(rng.randrange(3, 1000) for _ in range(own_len))]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(f"c{i}", prompt, params, arrival_s=float(i), consumption_rate=10.0)


def stems(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(length)] for _ in range(n)]


def fcfs_engine(*, num_pages: int = 128, prefix_cache: bool = True, budget: int = 16):
    config = EngineConfig(
        page_size=PAGE_SIZE,
        prefill_token_budget=budget,
        max_batch_size=8,
        prefix_cache=prefix_cache,
    )
    recorder = Recorder()
    runner = FakeRunner(num_pages=num_pages, page_size=PAGE_SIZE)
    engine = Engine(
        runner, FakeTokenizer(), config, FcfsPolicy(chunked=True), emit=recorder, model_id="fake"
    )
    return engine, recorder


def run(engine: Engine, requests: list[Request], *, every: int = 1) -> None:
    pending, steps = list(requests), 0
    while pending or engine.has_work:
        if pending and steps % every == 0:
            engine.add_request(pending.pop(0))
        engine.step()
        engine.check_idle()
        steps += 1
        assert steps < 10_000, "no progress"


# -- the cache's own books -----------------------------------------------------------------


def test_keys_chain_tokens_positions_and_model() -> None:
    cache = PrefixCache(PAGE_SIZE, "model-a")
    a, b, c = [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]
    k_ab = cache.chain([*a, *b], 2)
    assert cache.chain([*a, *b, *c], 3)[:2] == k_ab  # a page's key depends on what precedes it
    assert cache.chain([*b, *a], 2)[1] != k_ab[0]  # not on where it sits alone
    assert cache.chain([*c, *b], 2)[1] != k_ab[1]  # same tokens after another parent
    assert cache.chain(b, 1, parent=k_ab[0]) == k_ab[1:]  # chains continue from a parent
    assert PrefixCache(PAGE_SIZE, "model-b").chain(a, 1) != k_ab[:1]  # the model is part of it


def test_refcounts_and_lru_eviction() -> None:
    cache = PrefixCache(PAGE_SIZE, "m")
    keys = cache.chain(list(range(3, 15)), 3)
    assert [cache.insert(k, page) for k, page in zip(keys, (7, 8, 9), strict=True)] == [True] * 3
    assert not cache.insert(keys[0], 11), "a key names one page"
    assert cache.acquire(keys) == [7, 8, 9]  # second user
    cache.check([[7, 8, 9], [7, 8, 9]])
    for page in (9, 7, 8):  # the first user leaves
        assert cache.release(page)
    assert cache.num_evictable == 0
    for page in (9, 7, 8):  # the second leaves: unreferenced, LRU in release order
        cache.release(page)
    assert list(cache.evictable) == [9, 7, 8]
    cache.check([])
    assert cache.acquire(keys[:1]) == [7]  # a hit takes the page back out of the pool
    assert cache.evict() == 9 and cache.evict() == 8 and cache.num_evictable == 0
    assert cache.acquire(keys) == [7]  # the chain breaks at the evicted page
    assert not cache.release(42), "uncached pages are the caller's to free"


# -- in the engine ---------------------------------------------------------------------------


def test_second_request_skips_the_cached_pages_and_computes_its_last_prompt_token() -> None:
    engine, rec = fcfs_engine()
    stem = stems(1, 1, 20)[0]  # 5 full pages
    first = chat_request(0, stem, own_len=0, max_tokens=6)
    run(engine, [first])
    writes = engine.runner.num_calls
    second = chat_request(1, stem, own_len=3, max_tokens=6)
    run(engine, [second])
    assert second.num_cached_prompt_tokens == 20
    assert engine.runner.num_calls - writes == 3 + 5  # its own 3 tokens + 5 decode writes
    repeat = chat_request(0, stem, own_len=0, max_tokens=6)  # the identical prompt again
    repeat.request_id = "again"
    run(engine, [repeat])
    assert repeat.num_cached_prompt_tokens == 16, "the last prompt token is always computed"
    for r in (first, second, repeat):
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 6)
    stats = engine.kv.prefix.stats
    assert (stats.num_queries, stats.num_hit_tokens) == (3, 36)
    assert engine.kv.num_used_pages == 0 and engine.kv.prefix.num_evictable > 0


def test_multi_turn_reuses_the_previous_turns_output() -> None:
    engine, rec = fcfs_engine()
    turn1 = chat_request(0, stems(2, 1, 10)[0], own_len=0, max_tokens=11)
    run(engine, [turn1])
    history = turn1.prompt_ids + rec.tokens(turn1.request_id)  # 21 tokens, 20 computed
    turn2 = Request("t2", [*history, 17, 18], SamplingParams(max_tokens=5, ignore_eos=True), 1, 10)
    run(engine, [turn2])
    assert turn2.num_cached_prompt_tokens == 20
    assert rec.tokens("t2") == reference_tokens(turn2.prompt_ids, 5)


def test_evictable_pages_count_as_free_and_are_reclaimed_before_anything_fails() -> None:
    engine, rec = fcfs_engine(num_pages=12)  # 11 usable pages
    many = [chat_request(i, [], own_len=16, max_tokens=4) for i in range(6)]  # 5 pages each
    run(engine, many)
    assert engine.kv.prefix.num_evictable > 0
    assert engine.kv.num_free_pages == 11 and engine.view().num_free_pages == 11
    for r in many:
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 4)


def test_shared_pages_count_once_and_outlive_a_leaving_user() -> None:
    engine, rec = fcfs_engine()
    stem = stems(3, 1, 16)[0]
    a, b = chat_request(0, stem, 5, max_tokens=30), chat_request(1, stem, 7, max_tokens=30)
    engine.add_request(a)
    engine.step()
    engine.step()  # a decodes; its prompt pages are cached
    engine.add_request(b)
    for _ in range(3):
        engine.step()
    assert a.page_ids[:4] == b.page_ids[:4]
    assert engine.kv.num_used_pages == len(set(a.page_ids) | set(b.page_ids))
    engine.abort(a.request_id)
    engine.check_idle()
    assert all(engine.kv.prefix.refs[p] == 1 for p in b.page_ids[:4])
    run(engine, [])
    assert rec.tokens(b.request_id) == reference_tokens(b.prompt_ids, 30)


@pytest.mark.parametrize("budget", [4, 16, 64], ids=["chunk4", "chunk16", "whole"])
def test_outputs_identical_with_and_without_the_cache_batched_and_chunked(budget: int) -> None:
    shared = stems(4, 3, 13)
    requests = lambda: [  # noqa: E731
        chat_request(i, shared[i % 3], own_len=1 + (7 * i) % 9, max_tokens=10) for i in range(16)
    ]
    outputs = []
    for prefix_cache in (True, False):
        engine, rec = fcfs_engine(num_pages=18, prefix_cache=prefix_cache, budget=budget)
        run(engine, requests())
        outputs.append({r.request_id: rec.tokens(r.request_id) for r in requests()})
        if prefix_cache:
            assert engine.kv.prefix.stats.num_hit_tokens > 0
            assert engine.kv.stats.num_preemptions > 0  # a tight pool: recompute preemption too
    assert outputs[0] == outputs[1]
    assert outputs[0] == {r.request_id: reference_tokens(r.prompt_ids, 10) for r in requests()}


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    p_preempt=st.floats(0.02, 0.3),
    p_abort=st.floats(0.0, 0.05),
    num_pages=st.sampled_from([24, 64]),
)
def test_storm_of_overlapping_prefixes_aborts_and_swaps_keeps_books_and_outputs(
    seed: int, p_preempt: float, p_abort: float, num_pages: int
) -> None:
    engine, rec = make_offload_engine(StormPolicy(seed, p_preempt, 0.6), num_pages=num_pages)
    rng = random.Random(seed)
    shared = stems(seed, 4, 11)
    requests = [
        chat_request(i, shared[rng.randrange(4)][: rng.randrange(4, 12)], rng.randrange(1, 9), 12)
        for i in range(24)
    ]
    aborted: set[str] = set()
    pending, ticks, steps = list(requests), 0, 0
    deadline = time.monotonic() + 120.0
    while pending or engine.has_work:
        if pending and ticks % 2 == 0:
            engine.add_request(pending.pop(0))
        ticks += 1
        live = list(engine.requests)
        if live and rng.random() < p_abort:
            victim = rng.choice(live)
            aborted.add(victim)
            engine.abort(victim)
        if engine.step():
            steps += 1
        else:  # every live request waits for a host copy: as many such ticks as the copies take
            time.sleep(IDLE_STEP_S)
        engine.check_idle()
        assert steps < 10_000 and time.monotonic() < deadline, "no progress"
    engine.kv.offload.transfers.d2h.drain()
    for r in requests:
        expected = reference_tokens(r.prompt_ids, 12)
        got = rec.tokens(r.request_id)
        assert got == (expected[: len(got)] if r.request_id in aborted else expected), r.request_id
    kv = engine.kv
    assert kv.num_used_pages == 0 and kv.host.num_request_pages == 0
    assert kv.device.num_used == kv.prefix.num_evictable
    assert kv.prefix.stats.num_hit_tokens > 0
