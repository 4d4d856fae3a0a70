"""Host loads off the critical path: LOADING across steps, per-request copies, padded bytes.

The H2D link is gated in these tests, so a load stays in flight for as many steps as the test
wants; the fake runner derives every token from the KV it reads back, so a page scattered into
the wrong place, or too late, changes the tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future

import jax

from tests.fakes import FakeRunner, FakeTokenizer, drive, reference_tokens
from tests.test_engine import Recorder, make_request
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.request import RequestStatus
from tfjax.sched.base import Plan, PrefillChunk, Resume, ResumeMode, SchedulerView
from tfjax.sched.fcfs import FcfsPolicy

PAGE_SIZE = 4


class ScriptedPolicy:
    """Admits and prefills everything, decodes every running request; preempts and resumes
    (by LOAD) exactly the requests the test names. Resumed requests are listed in `decode`
    at once, which the manager must skip while they load."""

    name = "scripted"
    resumes_by_load = True

    def __init__(self) -> None:
        self.preempt: set[str] = set()
        self.load: set[str] = set()

    def plan(self, view: SchedulerView) -> Plan:
        preempt = [r.request_id for r in view.resident if r.request_id in self.preempt]
        resume = [r.request_id for r in view.preempted if r.request_id in self.load]
        self.preempt.clear()
        self.load.clear()
        chunks = [
            PrefillChunk(request_id=r.request_id, num_tokens=r.num_uncomputed_prefill)
            for r in [*view.prefilling, *view.waiting]
            if r.request_id not in preempt
        ]
        decode = [r.request_id for r in view.running if r.request_id not in preempt]
        return Plan(
            preempt=tuple(preempt),
            resume=tuple(Resume(request_id=i, mode=ResumeMode.LOAD) for i in resume),
            admit=tuple(r.request_id for r in view.waiting),
            prefill=tuple(chunks),
            decode=(*decode, *resume),
            write_through=True,
        )


class _GatedResult:
    def __init__(self, inner: Future[jax.Array], gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate

    def result(self) -> jax.Array:
        assert self.gate.wait(timeout=30), "gate never opened"
        return self.inner.result()


class GatedTransfers(Transfers):
    """Loads wait on the H2D worker until the test opens `gate` (a very slow link)."""

    def __init__(self, sharding: jax.sharding.Sharding) -> None:
        super().__init__(sharding, max_bytes_in_flight=1 << 20)
        self.gate = threading.Event()

    def load(
        self, host_pages: Future[jax.Array], nbytes: int, *, after_evictions: bool = False
    ) -> Future[jax.Array]:
        gated = _GatedResult(host_pages, self.gate)
        return super().load(gated, nbytes, after_evictions=after_evictions)  # type: ignore[arg-type]


class PaddingRunner(FakeRunner):
    """Pads every gather to a power of two pages, as the real runner's gather buckets do."""

    def gather(self, page_ids: Sequence[int]) -> jax.Array:
        bucket = 1 << max(0, len(page_ids) - 1).bit_length()
        return super().gather([*page_ids, *[0] * (bucket - len(page_ids))])


def make_engine(policy, *, runner: FakeRunner | None = None, host_pages: int = 512):
    runner = runner or FakeRunner(num_pages=64, page_size=PAGE_SIZE)
    transfers = GatedTransfers(runner.pages_sharding)
    offload = Offload(host=HostTier(host_pages, PAGE_SIZE), transfers=transfers, io=runner)
    # The scripted policy prefills whole prompts: the budget covers the whole pool.
    budget = runner.num_pages * PAGE_SIZE
    config = EngineConfig(page_size=PAGE_SIZE, prefill_token_budget=budget, max_batch_size=8)
    recorder = Recorder()
    engine = Engine(runner, FakeTokenizer(), config, policy, emit=recorder, offload=offload)
    return engine, recorder, transfers


def preempt_and_start_loading(engine: Engine, policy: ScriptedPolicy, request_id: str) -> None:
    policy.preempt.add(request_id)
    engine.step()
    engine.kv.offload.transfers.d2h.drain()
    policy.load.add(request_id)
    engine.step()
    assert engine.requests[request_id].status is RequestStatus.LOADING


def test_others_decode_while_a_load_is_in_flight_and_the_loaded_request_continues_exactly() -> None:
    policy = ScriptedPolicy()
    engine, rec, transfers = make_engine(policy)
    a, b = (
        make_request(1, prompt_len=10, max_tokens=40),
        make_request(2, prompt_len=7, max_tokens=40),
    )
    engine.add_request(a)
    engine.add_request(b)
    for _ in range(6):
        engine.step()
    preempt_and_start_loading(engine, policy, a.request_id)
    tokens_a = len(rec.tokens(a.request_id))
    for _ in range(5):  # the load is stuck on the link for five steps
        tokens_b = len(rec.tokens(b.request_id))
        assert engine.step()
        assert len(rec.tokens(b.request_id)) == tokens_b + 1, "b stopped decoding"
        assert a.status is RequestStatus.LOADING and len(rec.tokens(a.request_id)) == tokens_a
        engine.check_idle()
    assert engine.kv.stats.num_loads == 0
    transfers.gate.set()
    transfers.h2d.drain()
    engine.step()  # scatters a's pages first, so a decodes in this very step
    assert engine.kv.stats.num_loads == 1
    assert len(rec.tokens(a.request_id)) == tokens_a + 1
    drive(engine, [])
    for r in (a, b):
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 40), r.request_id
    assert engine.kv.num_used_pages == 0 and engine.kv.host.num_request_pages == 0


def test_aborting_a_loading_request_frees_its_pages_and_its_late_copy_lands_nowhere() -> None:
    policy = ScriptedPolicy()
    engine, rec, transfers = make_engine(policy, runner=FakeRunner(num_pages=32, page_size=4))
    a = make_request(3, prompt_len=13, max_tokens=30)
    engine.add_request(a)
    for _ in range(8):
        engine.step()
    preempt_and_start_loading(engine, policy, a.request_id)
    held = list(a.page_ids)
    engine.abort(a.request_id)
    assert a.page_ids == [] and a.request_id not in engine.kv.host.copies
    engine.check_idle()
    # c takes every free page, a's old ones too; a's copy then arrives and must not be
    # scattered into them (c's second token reads them back).
    c = make_request(5, prompt_len=engine.kv.num_free_pages * PAGE_SIZE - 1, max_tokens=2)
    engine.add_request(c)
    engine.step()
    assert set(held) <= set(c.page_ids)
    transfers.gate.set()
    transfers.h2d.drain()
    drive(engine, [])
    assert rec.tokens(c.request_id) == reference_tokens(c.prompt_ids, 2)
    assert engine.kv.stats.num_loads == 0
    assert engine.kv.num_used_pages == 0 and engine.kv.host.num_request_pages == 0


def test_copies_are_per_request_and_a_load_moves_only_its_own_bytes() -> None:
    policy = ScriptedPolicy()
    engine, _, transfers = make_engine(policy)
    transfers.gate.set()
    requests = [make_request(10 + i, prompt_len=9 + 4 * i, max_tokens=30) for i in range(3)]
    for r in requests:
        engine.add_request(r)
    for _ in range(10):
        engine.step()
    transfers.d2h.drain()
    host = engine.kv.host
    owners: dict[int, set[str]] = {}
    for request_id, copy in host.copies.items():
        for page in copy.pages.values():
            owners.setdefault(id(page.block), set()).add(request_id)
    assert len(owners) >= 3 and all(len(o) == 1 for o in owners.values())
    victim = requests[1]
    preempt_and_start_loading(engine, policy, victim.request_id)
    own_bytes = sum(
        {
            id(p.block): p.block.nbytes for p in host.copies[victim.request_id].pages.values()
        }.values()
    )
    transfers.h2d.drain()
    assert transfers.h2d.bytes_done == own_bytes


def test_host_budget_counts_padded_slots() -> None:
    policy = ScriptedPolicy()
    runner = PaddingRunner(num_pages=64, page_size=PAGE_SIZE)
    engine, _, _ = make_engine(policy, runner=runner, host_pages=7)
    first = make_request(20, prompt_len=12, max_tokens=8)
    engine.add_request(first)
    engine.step()  # prefill: 3 full pages
    engine.step()  # decode, then write-through copies pages 0..2 into one 4-slot block
    host = engine.kv.host
    assert sorted(host.copies[first.request_id].pages) == [0, 1, 2]
    assert host.num_used_pages == 4 and host.num_free_pages == 3
    second = make_request(21, prompt_len=12, max_tokens=8)
    engine.add_request(second)
    engine.step()
    engine.step()  # its 3 pages would fit 3 free slots, but they pad to 4: not copied
    assert second.request_id not in host.copies and host.num_used_pages == 4
    engine.check_idle()


def test_policies_that_never_load_get_no_host_copies() -> None:
    runner = FakeRunner(num_pages=14, page_size=PAGE_SIZE)
    engine, rec, transfers = make_engine(FcfsPolicy(chunked=True), runner=runner)
    requests = [make_request(30 + i, prompt_len=6 + i, max_tokens=16) for i in range(6)]
    drive(engine, requests)
    assert engine.kv.stats.num_preemptions > 0 and engine.kv.stats.num_swap_preemptions == 0
    assert transfers.d2h.bytes_done == 0 and engine.kv.host.num_request_pages == 0
    for r in requests:
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 16)
