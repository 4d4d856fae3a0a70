"""TokenFlow decisions on hand-built views: safety rule, hysteresis, capacity, LOAD/RECOMPUTE."""

from __future__ import annotations

import pytest

from tests.sched.helpers import PF, FakeHost, P, R, check_plan, make_request, make_view
from tests.test_engine import make_engine
from tests.test_engine import make_request as make_engine_request
from tfjax.kv.manager import StepWork
from tfjax.sched.base import Costs, ResumeMode
from tfjax.sched.fcfs import FcfsPolicy
from tfjax.sched.tokenflow import TokenFlowConfig, TokenFlowPolicy, resume_mode

# 0.1 s per decode step up to batch 64: an interval (0.5 s) of growth is 5 tokens = 2 pages.
SLOW = Costs(
    decode_step_s={1: 0.1, 64: 0.1},
    prefill_token_s=1e-3,
    kv_bytes_per_token=1000,
    d2h_bytes_per_s=1e9,
    h2d_bytes_per_s=1e9,
)


def synced(*requests) -> FakeHost:
    return FakeHost({r.request_id: r.num_computed_tokens for r in requests})


def resident(rid: str, buffer_s: float, *, arrival: float = 0.0, rate: float = 2.0):
    # prompt 8 + 40 outputs: 47 computed tokens in 12 pages.
    return make_request(rid, R, arrival=arrival, output=40, rate=rate, buffer_s=buffer_s)


def test_new_request_displaces_only_a_safely_preemptible_resident() -> None:
    # Safety: b >= mu * r * (t_evict + t_load + t_schedule) = 2 * 2 * (0 + ~0 + 0.5) = 2 tokens.
    # Readers at 2 tok/s: the 13-page device holds one request, Gamma = 10 tok/s, and its one
    # free page is the running request's headroom, so FCFS would start nothing.
    for buffer_s, preempted in ((3.0, True), (0.5, False)):
        a = resident("a", buffer_s)
        b = make_request("b", arrival=5.0, rate=2.0)
        view = make_view([a, b], total_pages=13, host=synced(a), costs=SLOW)
        plan = TokenFlowPolicy().plan(view)
        check_plan(view, plan)
        if preempted:
            assert plan.preempt == ("a",) and plan.admit == ("b",)
        else:
            assert plan.preempt == () and plan.admit == ()
            assert plan.decode == ("a",)


def test_hysteresis_margin() -> None:
    # A preempted request whose buffer is about to run out (0.9 s) displaces a resident only if
    # the resident's buffer is larger by more than hysteresis_s (2 s).
    for resident_buffer, swapped in ((2.5, False), (3.5, True)):
        a = resident("a", resident_buffer)
        c = make_request("c", P, arrival=1.0, output=40, rate=2.0, buffer_s=0.9)
        view = make_view([a, c], total_pages=14, host=synced(a, c), costs=SLOW)
        plan = TokenFlowPolicy().plan(view)
        check_plan(view, plan)
        if swapped:
            assert plan.preempt == ("a",)
            assert [(x.request_id, x.mode) for x in plan.resume] == [("c", ResumeMode.LOAD)]
            assert plan.decode == ("c",)  # a LOAD-resumed request decodes in the same step
        else:
            assert plan.preempt == () and plan.resume == ()


def test_switch_budget_limits_context_switches_not_new_prompts() -> None:
    a = resident("a", 3.5)
    c = make_request("c", P, arrival=1.0, output=40, rate=2.0, buffer_s=0.9)
    view = make_view([a, c], total_pages=14, host=synced(a, c), costs=SLOW)
    assert TokenFlowPolicy(switch_budget=0.0).plan(view).preempt == ()
    b = make_request("b", arrival=5.0, rate=2.0)
    view = make_view([a, b], total_pages=13, host=synced(a), costs=SLOW)
    assert TokenFlowPolicy(switch_budget=0.0).plan(view).preempt == ("a",)


def test_capacity_fallback_is_plain_fcfs() -> None:
    # Gamma here is at most 16 rows / 0.1 s = 160 tok/s; one 1000 tok/s reader exceeds it.
    # Then the plan is fcfs's: b is admitted and prefilled first (prefill-first), nobody is
    # preempted and a waits for the prompt.
    a = resident("a", 0.02, rate=1000.0)
    b = make_request("b", arrival=5.0, rate=2.0)
    view = make_view([a, b], total_pages=64, host=synced(a), costs=SLOW)
    policy = TokenFlowPolicy()
    plan = policy.plan(view)
    check_plan(view, plan)
    assert policy.fallback and policy.num_fallback_decisions == 1
    assert plan == FcfsPolicy().plan(view)
    assert plan.preempt == () and plan.decode == () and plan.admit == ("b",)
    # Under a long-prefill threshold the fallback is fcfs-chunked's: a decodes alongside.
    capped = make_view([a, b], total_pages=64, host=synced(a), costs=SLOW,
                       long_prefill_token_threshold=32)  # fmt: skip
    plan = TokenFlowPolicy().plan(capped)
    assert plan == FcfsPolicy(chunked=True).plan(capped)
    assert plan.decode == ("a",) and plan.admit == ("b",)


def test_a_reader_faster_than_the_device_still_gets_served() -> None:
    # An idle device always takes the head of the queue, whatever its declared rate.
    fast = make_request("fast", arrival=1.0, rate=1e6)
    view = make_view([fast], total_pages=64, costs=SLOW)
    assert TokenFlowPolicy().plan(view).admit == ("fast",)


def test_work_conserving_when_unstressed() -> None:
    # Nothing waits, no buffer is critical: everyone resident decodes, nobody is preempted, and
    # a preempted request with a comfortable buffer is loaded into free pages.
    a = resident("a", 3.0)
    b = resident("b", 3.5, arrival=1.0)
    c = make_request("c", P, arrival=2.0, output=40, rate=2.0, buffer_s=3.0)
    view = make_view([a, b, c], total_pages=64, host=synced(a, b, c), costs=SLOW)
    policy = TokenFlowPolicy()
    plan = policy.plan(view)
    check_plan(view, plan)
    assert policy.num_decisions == 0  # not stressed: no balancing decision
    assert plan.preempt == ()
    assert set(plan.decode) == {"a", "b", "c"}
    assert [(x.request_id, x.mode) for x in plan.resume] == [("c", ResumeMode.LOAD)]


def test_decisions_run_on_arrivals_and_intervals_only() -> None:
    a = resident("a", 0.5)  # critical: stressed
    policy = TokenFlowPolicy()
    policy.plan(make_view([a], host=synced(a), costs=SLOW, now=10.0))
    assert policy.num_decisions == 1
    policy.plan(make_view([a], host=synced(a), costs=SLOW, now=10.1))
    assert policy.num_decisions == 1  # within the interval, no arrival
    b = make_request("b", arrival=10.2)
    policy.plan(make_view([a, b], host=synced(a), costs=SLOW, now=10.2))
    assert policy.num_decisions == 2  # an arrival triggers a decision
    policy.plan(make_view([a, b], host=synced(a), costs=SLOW, now=10.8))
    assert policy.num_decisions == 3  # the interval has passed


def test_load_or_recompute() -> None:
    r = make_request("r", P, output=40, buffer_s=1.0)  # 47 computed tokens
    full = synced(r)
    assert resume_mode(make_view([r], host=full), r) is ResumeMode.LOAD
    assert resume_mode(make_view([r], host=None), r) is ResumeMode.RECOMPUTE
    # Host lost it (full pool): recompute. Tail copy still in flight: wait (None).
    assert resume_mode(make_view([r], host=FakeHost()), r) is ResumeMode.RECOMPUTE
    in_flight = FakeHost({"r": 40}, queued={"r": 47})
    assert resume_mode(make_view([r], host=in_flight), r) is None
    assert resume_mode(make_view([r], host=FakeHost({"r": 40})), r) is ResumeMode.RECOMPUTE
    # A slow link makes loading dearer than re-prefilling 47 tokens at 1 ms each.
    slow_link = Costs(prefill_token_s=1e-3, kv_bytes_per_token=1000, h2d_bytes_per_s=1e6)
    assert resume_mode(make_view([r], host=full, costs=slow_link), r) is ResumeMode.RECOMPUTE
    # Preempted in the middle of its prefill: no output yet, so recompute.
    half = make_request("h", P, computed=4)
    assert resume_mode(make_view([half], host=synced(half)), half) is ResumeMode.RECOMPUTE


def test_prefill_first_while_a_prompt_backlog_lasts_or_buffers_allow() -> None:
    # A prefill step of 8 new tokens takes 0.1 s (batch-1 step) + 8 ms: a reader with 3 s of
    # buffer waits it out, one with 0.05 s rides along (decodes in the same step).
    thin = resident("a", 0.05)
    short = make_request("s", arrival=5.0, rate=2.0, prompt=8)
    view = make_view([thin, short], total_pages=64, host=synced(thin), costs=SLOW, budget=64)
    plan = TokenFlowPolicy().plan(view)
    assert plan.admit == ("s",) and plan.decode == ("a",)  # 8 queued tokens: decode rides along
    deep = resident("a", 3.0)
    view = make_view([deep, short], total_pages=64, host=synced(deep), costs=SLOW, budget=64)
    plan = TokenFlowPolicy().plan(view)
    assert plan.admit == ("s",) and plan.decode == ()  # the buffer covers the prefill step
    long = make_request("l", arrival=5.0, rate=2.0, prompt=80)
    view = make_view([thin, long], total_pages=64, host=synced(thin), costs=SLOW, budget=64)
    plan = TokenFlowPolicy().plan(view)
    assert plan.admit == ("l",) and plan.decode == ()  # 80 > 64 queued: prefill first
    assert TokenFlowPolicy(prefill_first_backlog=2.0).plan(view).decode == ("a",)
    # Capped at 32 tokens a step, the long prompt is no backlog: decode rides along.
    capped = make_view([thin, long], total_pages=64, host=synced(thin), costs=SLOW, budget=64,
                       long_prefill_token_threshold=32)  # fmt: skip
    plan = TokenFlowPolicy().plan(capped)
    assert [(c.request_id, c.num_tokens) for c in plan.prefill] == [("l", 32)]
    assert plan.decode == ("a",)
    a = resident("a", 3.0)
    # A recompute re-prefill never pauses the others.
    c = make_request("c", PF, arrival=1.0, output=5, rate=2.0, computed=4)
    view = make_view([a, c], total_pages=64, host=synced(a), costs=SLOW)
    plan = TokenFlowPolicy().plan(view)
    assert [x.request_id for x in plan.prefill] == ["c"] and plan.decode == ("a",)


def test_memory_pressure_preempts_the_largest_buffer() -> None:
    # Both sit on a page boundary and no page is free: one must go, the one with more buffer.
    a = make_request("a", R, prompt=7, output=2, rate=1.0, buffer_s=2.0)
    b = make_request("b", R, arrival=1.0, prompt=7, output=2, rate=1.0, buffer_s=1.0)
    view = make_view([a, b], total_pages=4, host=synced(a, b), costs=SLOW)
    policy = TokenFlowPolicy()
    policy._next_decision_s = 1e9  # between decisions
    plan = policy.plan(view)
    check_plan(view, plan)
    assert plan.preempt == ("a",) and plan.decode == ("b",)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TokenFlowConfig(schedule_interval_s=0)
    with pytest.raises(TypeError):
        TokenFlowPolicy(no_such_knob=1)


def test_a_non_streaming_resident_is_never_displaced_for_its_buffer() -> None:
    # The case of test_new_request_displaces_only_a_safely_preemptible_resident, but the
    # resident's client reads at the end: its "buffer" of generated tokens is no reason to
    # pause it. It wants a whole row's rate (Gamma here: the device holds one request), so the
    # device is at capacity and the plan is fcfs's: b waits (the one free page is a's headroom).
    for streaming, displaced in ((True, True), (False, False)):
        a = resident("a", 3.0)
        a.streaming = streaming
        b = make_request("b", arrival=5.0, rate=2.0)
        view = make_view([a, b], total_pages=13, host=synced(a), costs=SLOW)
        plan = TokenFlowPolicy().plan(view)
        check_plan(view, plan)
        assert plan.preempt == (("a",) if displaced else ())
        if not displaced:
            assert plan == FcfsPolicy().plan(view)


def test_capacity_fallback_resumes_by_load_where_fcfs_would_recompute() -> None:
    # Overloaded (a 1000 tok/s reader): the plan is fcfs's, except that a preempted request
    # whose host copy is complete comes back by LOAD (47 tokens: 12 pages, its next token fits
    # in the last one) and decodes in the same step, instead of re-prefilling 47 tokens.
    a = resident("a", 0.02, rate=1000.0)
    c = make_request("c", P, arrival=1.0, output=40, rate=2.0, buffer_s=0.0)
    view = make_view([a, c], total_pages=64, host=synced(a, c), costs=SLOW)
    policy = TokenFlowPolicy()
    plan = policy.plan(view)
    check_plan(view, plan)
    assert policy.fallback
    assert [(x.request_id, x.mode) for x in plan.resume] == [("c", ResumeMode.LOAD)]
    assert plan.prefill == () and plan.decode == ("a", "c")
    fcfs = FcfsPolicy().plan(view)
    assert [(x.request_id, x.mode) for x in fcfs.resume] == [("c", ResumeMode.RECOMPUTE)]
    # While the tail of c's copy is still in flight, c waits a step (fcfs order: nobody passes).
    in_flight = FakeHost({"a": 47, "c": 40}, queued={"a": 47, "c": 47})
    view = make_view([a, c], total_pages=64, host=in_flight, costs=SLOW)
    plan = TokenFlowPolicy().plan(view)
    assert plan.resume == () and plan.decode == ("a",)


def test_capacity_is_judged_at_the_context_the_batch_will_have() -> None:
    # Measured: 0.1 s a batch-16 step with 64-token rows, 0.4 s with 1k-token rows.
    costs = Costs(
        decode_step_s={1: 0.05, 16: 0.1},
        decode_by_context_s={64: {16: 0.1}, 1024: {16: 0.4}},
        prefill_token_s=1e-4,
    )
    assert costs.decode_step_time(16, 50) == pytest.approx(0.1)
    assert costs.decode_step_time(16, 1000) == pytest.approx(0.4)
    # Batch 8 at 1k tokens: the 1k row's batch-16 step, scaled by the all-context table's shape.
    assert costs.decode_step_time(8, 1000) == pytest.approx(0.4 * (0.05 + 7 / 15 * 0.05) / 0.1)
    # 16 readers at 3 tok/s want 48 tok/s: under Gamma = 16 / 0.1 = 160 tok/s with short rows,
    # over Gamma = 16 / 0.4 = 40 tok/s when each row will hold 1,000 + 40 / 2 tokens.
    for prompt, overloaded in ((20, False), (1000, True)):
        waiting = [
            make_request(f"w{i}", arrival=0.01 * i, prompt=prompt, max_tokens=40, rate=3.0)
            for i in range(16)
        ]
        view = make_view(waiting, total_pages=5000, max_batch=16, budget=512, costs=costs)
        policy = TokenFlowPolicy()
        policy.plan(view)
        assert policy.fallback is overloaded


def test_the_engine_keeps_step_times_by_the_rows_context() -> None:
    engine, _ = make_engine(num_pages=64)
    short = [make_engine_request(i, prompt_len=30, max_tokens=8) for i in range(2)]
    long = [make_engine_request(i, prompt_len=200, max_tokens=8) for i in range(2, 4)]
    engine._measure(StepWork(prefill=(), decode=tuple(short)), 0.2)
    engine._measure(StepWork(prefill=(), decode=tuple(long)), 0.5)
    assert engine.costs.decode_by_context_s == {32: {2: 0.2}, 256: {2: 0.5}}
    assert engine.costs.decode_step_time(2, 30) == pytest.approx(0.2)
    assert engine.costs.decode_step_time(2, 220) == pytest.approx(0.5)
