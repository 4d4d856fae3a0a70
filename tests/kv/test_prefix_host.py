"""Second level of the prefix cache: a prefix evicted from the device comes back from the host.

A finished request's written-through full pages stay in the host pool under their prefix
keys. When the device copies have been evicted, a later request with that prefix loads them
(H2D, off the engine thread) if the cost rule says a load beats a recompute, and must produce
exactly the tokens a recompute gives.
"""

from __future__ import annotations

from dataclasses import replace

from tests.fakes import FakeRunner, reference_tokens
from tests.kv.test_loading import ScriptedPolicy, make_engine
from tests.kv.test_prefix import chat_request, stems
from tfjax.engine import Engine
from tfjax.request import Request, RequestStatus

PAGE_SIZE = 4


def finish(engine: Engine, request: Request) -> None:
    """Run `request` alone to the end, waiting for every copy after each step."""
    engine.add_request(request)
    while engine.has_work:
        engine.step()
        engine.kv.offload.transfers.d2h.drain()
        engine.kv.offload.transfers.h2d.drain()
        engine.check_idle()


def evicted_prefix_engine(*, host_pages: int = 512) -> tuple[Engine, list[int], object]:
    """An engine whose host pool holds a 24-token stem that the device no longer caches."""
    engine, rec, transfers = make_engine(
        ScriptedPolicy(),
        runner=FakeRunner(num_pages=16, page_size=PAGE_SIZE),
        host_pages=host_pages,
    )
    transfers.gate.set()
    stem = stems(7, 1, 24)[0]
    finish(engine, chat_request(0, stem, own_len=2, max_tokens=8))
    assert len(engine.kv.host.cached) >= 6
    for i in range(3):  # fillers that need every device page: the stem's pages are evicted
        finish(engine, chat_request(10 + i, [], own_len=14 * PAGE_SIZE, max_tokens=2))
    keys = engine.kv.prefix.chain(stem, 6)
    assert engine.kv.prefix.acquire(keys[:1]) == [], "the stem is still on the device"
    return engine, stem, rec


def test_a_prefix_evicted_from_the_device_is_loaded_back_from_the_host_exactly() -> None:
    engine, stem, rec = evicted_prefix_engine()
    request = chat_request(1, stem, own_len=3, max_tokens=8)
    engine.add_request(request)
    engine.step()
    assert request.status is RequestStatus.LOADING, "the hit should load, not recompute"
    assert request.num_cached_prompt_tokens == 24
    finish(engine, chat_request(2, [], own_len=1, max_tokens=1))  # step on until all are done
    assert rec.tokens(request.request_id) == reference_tokens(request.prompt_ids, 8)
    stats = engine.kv.prefix.stats
    assert stats.num_host_hit_tokens == 24
    assert engine.kv.num_used_pages == 0 and engine.kv.host.num_request_pages == 0


def test_a_slow_link_makes_the_cost_rule_recompute_with_the_same_tokens() -> None:
    engine, stem, rec = evicted_prefix_engine()
    engine.costs = replace(engine.costs, prefill_token_s=1e-12)  # recompute is ~free
    request = chat_request(1, stem, own_len=3, max_tokens=8)
    finish(engine, request)
    assert engine.kv.prefix.stats.num_host_hit_tokens == 0
    assert request.num_cached_prompt_tokens == 0
    assert rec.tokens(request.request_id) == reference_tokens(request.prompt_ids, 8)


def test_the_host_pool_yields_to_request_copies_within_the_budget() -> None:
    engine, _, _ = evicted_prefix_engine(host_pages=40)
    host = engine.kv.host
    assert host.num_used_pages <= host.num_total_pages
    assert host.num_pool_pages > 0  # the pool kept what fits
    big = chat_request(20, [], own_len=14 * PAGE_SIZE, max_tokens=12)
    engine.add_request(big)
    for _ in range(4):
        engine.step()
        engine.kv.offload.transfers.d2h.drain()
    assert host.num_synced_tokens(big.request_id) >= 14 * PAGE_SIZE  # written through in full
    assert host.num_used_pages <= host.num_total_pages
    engine.check_idle()


def test_a_burst_on_one_evicted_prefix_loads_it_once_and_shares_it() -> None:
    engine, stem, rec = evicted_prefix_engine()
    transfers = engine.kv.offload.transfers
    transfers.gate.clear()  # the first load stays in flight
    first = chat_request(1, stem, own_len=3, max_tokens=8)
    second = chat_request(2, stem, own_len=2, max_tokens=8)
    engine.add_request(first)
    engine.add_request(second)
    for _ in range(3):
        engine.step()
        assert first.status is RequestStatus.LOADING
        assert second.status is RequestStatus.PREFILLING and not second.page_ids, "no own load"
    transfers.gate.set()
    finish(engine, chat_request(3, [], own_len=1, max_tokens=1))  # step on until all are done
    for request in (first, second):
        assert rec.tokens(request.request_id) == reference_tokens(request.prompt_ids, 8)
        assert request.num_cached_prompt_tokens == 24
    stats = engine.kv.prefix.stats
    assert stats.num_host_hit_tokens == 24  # one load; the second request hit the device
    assert stats.num_hit_tokens >= 24
    assert engine.kv.num_used_pages == 0 and engine.kv.host.num_request_pages == 0
