"""Host KV tier on the fake runner: swap preemption, loads, write-through and fallbacks.

The fake runner derives every token from what it reads back through the page table, so a page
restored to the wrong place, a stale host copy or a lost tail shows up as a wrong token.
"""

from __future__ import annotations

import logging
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeRunner, FakeTokenizer, drive, reference_tokens
from tests.test_engine import Recorder, make_request
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.request import RequestStatus
from tfjax.sched.base import Plan, PrefillChunk, Resume, ResumeMode, SchedulerView
from tfjax.sched.packer import StepBudget, decode_pages_needed

PAGE_SIZE = 4


class StormPolicy:
    """Preempts and resumes at random (LOAD whenever the host copy allows), else FCFS."""

    name = "storm"
    resumes_by_load = True

    def __init__(self, seed: int, p_preempt: float, p_resume: float) -> None:
        self.rng = random.Random(seed)
        self.p_preempt = p_preempt
        self.p_resume = p_resume

    def plan(self, view: SchedulerView) -> Plan:
        resident = list(view.resident)
        preempt = [r for r in resident if self.rng.random() < self.p_preempt]
        kept = [r for r in resident if r not in preempt]
        free = view.num_free_pages + sum(len(r.page_ids) for r in preempt)
        running = [r for r in kept if r.status is RequestStatus.RUNNING]
        while decode_pages_needed(running, view.page_size) > free:
            victim = kept.pop()
            preempt.append(victim)
            free += len(victim.page_ids)
            running = [r for r in kept if r.status is RequestStatus.RUNNING]
        free -= decode_pages_needed(running, view.page_size)
        resume, decode = [], [r.request_id for r in running]
        rows_left = view.max_batch_size - len(kept)
        for r in view.preempted:
            synced = view.host.num_synced_tokens(r.request_id) if view.host else 0
            can_load = 0 < r.num_computed_tokens <= synced
            pages = -(-r.num_tokens // view.page_size)
            if can_load and self.rng.random() < self.p_resume and pages <= free and rows_left:
                free -= pages
                rows_left -= 1
                resume.append(Resume(request_id=r.request_id, mode=ResumeMode.LOAD))
                if r.num_uncomputed_prefill == 0:
                    decode.append(r.request_id)
        budget = StepBudget(view=view, free_pages=free, rows_left=rows_left)
        chunks = []
        for r in kept:
            if r.status is RequestStatus.PREFILLING and (
                n := budget.chunk(r, new_resident=False, from_scratch=False)
            ):
                chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
        admit = []
        loading = {x.request_id for x in resume}
        pending = [r for r in view.preempted if r.request_id not in loading]
        for r in [*pending, *view.waiting]:
            if r.status is RequestStatus.PREEMPTED and self.rng.random() > self.p_resume:
                continue
            recompute = r.status is RequestStatus.PREEMPTED
            n = budget.chunk(r, new_resident=True, from_scratch=recompute)
            if not n:
                break
            chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
            if recompute:
                resume.append(Resume(request_id=r.request_id, mode=ResumeMode.RECOMPUTE))
            else:
                admit.append(r.request_id)
        return Plan(
            preempt=tuple(r.request_id for r in preempt),
            resume=tuple(resume),
            admit=tuple(admit),
            prefill=tuple(chunks),
            decode=tuple(decode),
            write_through=True,
        )


def make_offload_engine(
    policy,
    *,
    num_pages: int = 64,
    host_pages: int = 512,
    write_through: bool = True,
    overlap: bool = True,
) -> tuple[Engine, Recorder]:
    runner = FakeRunner(num_pages=num_pages, page_size=PAGE_SIZE)
    offload = Offload(
        host=HostTier(host_pages, PAGE_SIZE),
        transfers=Transfers(runner.pages_sharding, max_bytes_in_flight=1 << 20),
        io=runner,
        write_through=write_through,
        overlap=overlap,
    )
    config = EngineConfig(page_size=PAGE_SIZE, prefill_token_budget=16, max_batch_size=32)
    recorder = Recorder()
    engine = Engine(runner, FakeTokenizer(), config, policy, emit=recorder, offload=offload)
    return engine, recorder


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    p_preempt=st.floats(0.02, 0.3),
    p_resume=st.floats(0.1, 0.9),
    write_through=st.booleans(),
    overlap=st.booleans(),
)
def test_preempt_resume_storm_keeps_outputs_and_books(
    seed: int, p_preempt: float, p_resume: float, write_through: bool, overlap: bool
) -> None:
    engine, rec = make_offload_engine(
        StormPolicy(seed, p_preempt, p_resume), write_through=write_through, overlap=overlap
    )
    requests = [
        make_request(seed + i, prompt_len=1 + (seed + 5 * i) % 23, max_tokens=12) for i in range(24)
    ]
    drive(engine, requests)
    for r in requests:
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 12), r.request_id
    assert engine.kv.stats.num_preemptions > 0
    assert engine.kv.num_used_pages == 0 and engine.kv.host.num_request_pages == 0


def test_swap_resume_restores_kv_exactly_with_and_without_write_through() -> None:
    for write_through in (True, False):
        policy = StormPolicy(seed=1, p_preempt=0.0, p_resume=1.0)
        engine, rec = make_offload_engine(policy, write_through=write_through)
        request = make_request(7, prompt_len=10, max_tokens=30)
        engine.add_request(request)
        for _ in range(12):
            engine.step()
        saved = engine.runner.kv[request.page_ids].copy()
        policy.p_preempt = 1.0
        engine.step()
        assert request.status is RequestStatus.PREEMPTED and request.page_ids == []
        engine.kv.offload.transfers.d2h.drain()
        policy.p_preempt = 0.0
        engine.step()  # resumes by LOAD: the copy starts, the request is LOADING
        assert request.status is RequestStatus.LOADING and engine.kv.stats.num_loads == 0
        engine.kv.offload.transfers.h2d.drain()
        engine.step()  # the pages arrived: scattered, and the request decodes again
        assert engine.kv.stats.num_loads == 1
        restored = engine.runner.kv[request.page_ids]
        n = saved.size - (saved == -1).sum()
        assert (restored.reshape(-1)[:n] == saved.reshape(-1)[:n]).all()
        drive(engine, [])
        assert rec.tokens(request.request_id) == reference_tokens(request.prompt_ids, 30)


def test_write_through_copies_before_preemption() -> None:
    engine, _ = make_offload_engine(StormPolicy(seed=3, p_preempt=0.0, p_resume=1.0))
    request = make_request(3, prompt_len=16, max_tokens=40)
    engine.add_request(request)
    for _ in range(10):
        engine.step()
    engine.kv.offload.transfers.d2h.drain()
    synced = engine.kv.host.num_synced_tokens(request.request_id)
    assert synced >= (request.num_computed_tokens // PAGE_SIZE) * PAGE_SIZE > 0


def test_host_pool_exhausted_falls_back_to_recompute(caplog) -> None:
    engine, rec = make_offload_engine(
        StormPolicy(seed=5, p_preempt=0.2, p_resume=0.5), host_pages=3
    )
    requests = [make_request(50 + i, prompt_len=9, max_tokens=15) for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="tfjax.kv.manager"):
        drive(engine, requests)
    assert engine.kv.stats.num_host_full_fallbacks > 0
    assert "host KV pool full" in caplog.text
    for r in requests:
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 15)
