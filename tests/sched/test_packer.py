"""The packer: every policy's plan is work-conserving against FCFS in the same state."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sched.helpers import R, W, check_plan, make_request, make_view
from tests.sched.test_contract import views
from tfjax.sched.base import Costs, SchedulerView
from tfjax.sched.fcfs import FcfsPolicy
from tfjax.sched.packer import Decision, Packer, num_resident_after, prefill_tokens
from tfjax.sched.registry import POLICY_NAMES, make_policy
from tfjax.sched.tokenflow import resume_mode


def with_demand(view: SchedulerView, factor: float) -> SchedulerView:
    """`view` with every reader declaring an equal share of `factor` times the device's
    capacity at its batch cap (0.5: half loaded; 2: twice overloaded)."""
    members = [*view.waiting, *view.prefilling, *view.running, *view.preempted]
    rate = factor * view.costs.decode_capacity(view.max_batch_size) / len(members)
    for r in members:
        r.consumption_rate = r.reader.rate = rate
    return view


def fcfs_reference(view: SchedulerView, name: str):
    """FCFS in the same state with the same KV tier: a preempted request comes back from its
    host copy where the policy may load it and that beats a recompute (the packer's queue
    order with TokenFlow's `resume_mode`, which is exactly TokenFlow's FCFS fallback), else
    by recompute; prefill-first as `fcfs`, or decode beside prefill as `fcfs-chunked`."""
    chunked = name in ("fcfs-chunked", "andes")
    if view.host is None or not make_policy(name).resumes_by_load:
        return FcfsPolicy(chunked=chunked).plan(view)
    modes = {r.request_id: resume_mode(view, r) for r in view.preempted}
    return Packer().pack(view, Decision(resume=modes, prefill_first=not chunked))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    view=views(),
    demand=st.sampled_from([0.5, 0.9, 1.0, 1.1, 2.0]),
    between_decisions=st.booleans(),
)
def test_no_policy_plans_fewer_rows_or_prompt_tokens_than_fcfs(
    view: SchedulerView, demand: float, between_decisions: bool
) -> None:
    """Random queues, pools, batch caps and budgets, with and without a host tier, declared
    demand from half to twice the capacity (the boundary included): every policy keeps at
    least as many requests on the device as FCFS would (a pause counts only when a newcomer
    takes its place) and prefills at least as many prompt tokens."""
    view = with_demand(view, demand)
    for name in POLICY_NAMES:
        policy = make_policy(name)
        if between_decisions and name == "tokenflow":
            policy._next_decision_s = math.inf
            policy._last_arrival_s = math.inf
        plan = policy.plan(view)
        check_plan(view, plan)
        reference = fcfs_reference(view, name)
        assert num_resident_after(view, plan) >= num_resident_after(view, reference), name
        assert prefill_tokens(plan) >= prefill_tokens(reference), name


def test_without_a_host_tier_tokenflow_admits_what_fcfs_admits() -> None:
    """Issue 23's `--no-offload` case by hand: 32 chat requests declaring 1 tok/s with chat's
    default `max_tokens` (the rest of a 4k context) into a 300-page pool. Eq. 4's working-set
    bound is 300 pages * 2 (overcommit) / 257 pages a request's final footprint = 2 requests,
    yet the 32 prompts of 16 tokens take one page each, the prefill budget holds them all, and
    FCFS admits all 32 in one step: so must TokenFlow (before the packer it admitted 1)."""
    requests = [
        make_request(f"r{i}", W, arrival=0.01 * i, prompt=16, max_tokens=4096 - 16, rate=1.0)
        for i in range(32)
    ]
    costs = Costs(decode_step_s={1: 0.05, 32: 0.3}, prefill_token_s=1e-3)
    view = make_view(requests, total_pages=300, max_batch=32, budget=512, costs=costs)
    fcfs = FcfsPolicy().plan(view)
    tokenflow = make_policy("tokenflow").plan(view)
    check_plan(view, tokenflow)
    assert len(fcfs.admit) == 32
    assert sorted(tokenflow.admit) == sorted(fcfs.admit)
    assert prefill_tokens(tokenflow) == prefill_tokens(fcfs) == 32 * 16


def test_pauses_beyond_their_replacements_are_dropped() -> None:
    """The decision lets a and b go for c; c needs one row, so pausing both would lose one:
    only a (the first) is paused."""
    a = make_request("a", R, output=4, buffer_s=0.1)
    b = make_request("b", R, arrival=0.5, output=4, buffer_s=0.1)
    c = make_request("c", W, arrival=1.0)
    view = make_view([a, b, c], max_batch=2)
    plan = Packer().pack(view, Decision(pause=(a, b), first=(c,), prefill_first=False))
    assert (plan.preempt, plan.admit, plan.decode) == (("a",), ("c",), ("b",))


def test_two_pauses_for_one_newcomer_are_not_made() -> None:
    """a and b hold one page each of a two-page pool. Pausing a frees one page, which b keeps
    as its headroom, so c would need b's page too: two rows for one. Nobody is paused."""
    a = make_request("a", R, prompt=2, output=1, buffer_s=0.1)
    b = make_request("b", R, arrival=0.5, prompt=2, output=1, buffer_s=0.1)
    c = make_request("c", W, arrival=1.0)
    view = make_view([a, b, c], total_pages=2)
    plan = Packer().pack(view, Decision(pause=(a, b), first=(c,), prefill_first=False))
    assert (plan.preempt, plan.admit, plan.decode) == ((), (), ("a", "b"))
