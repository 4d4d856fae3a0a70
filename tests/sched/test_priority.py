"""`priority` in every policy (vLLM's semantics): lower value first, ties by arrival; victims
from the lowest priority; tokenflow never displaces a request for one of lower priority."""

from __future__ import annotations

import pytest

from tests.sched.helpers import P, R, check_plan, make_request, make_view
from tests.sched.test_tokenflow import SLOW, resident, synced
from tfjax.sched.registry import POLICY_NAMES, make_policy


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_admission_follows_priority_then_arrival(policy: str) -> None:
    # Four wait, the batch cap takes two. The two urgent ones (-1) go first however late they
    # came, and between them the earlier one leads.
    early = make_request("early", arrival=0.0)
    urgent_late = make_request("urgent_late", arrival=3.0, priority=-1)
    urgent = make_request("urgent", arrival=2.0, priority=-1)
    lazy = make_request("lazy", arrival=1.0, priority=5)
    view = make_view([early, urgent_late, urgent, lazy], total_pages=40, max_batch=2)
    plan = make_policy(policy).plan(view)
    check_plan(view, plan)
    assert plan.admit == ("urgent", "urgent_late")


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_memory_pressure_preempts_the_lowest_priority_first(policy: str) -> None:
    # All three sit on a page boundary and no page is free: one must go. Under plain FCFS it
    # would be the newest ("c"); by priority it is the oldest, least important one ("a").
    a = make_request("a", R, arrival=0.0, prompt=7, output=2, rate=1.0, buffer_s=1.0, priority=2)
    b = make_request("b", R, arrival=1.0, prompt=7, output=2, rate=1.0, buffer_s=1.0)
    c = make_request("c", R, arrival=2.0, prompt=7, output=2, rate=1.0, buffer_s=1.0)
    view = make_view([a, b, c], total_pages=6, host=synced(a, b, c), costs=SLOW)
    assert view.num_free_pages == 0
    p = make_policy(policy)
    if policy == "tokenflow":
        p._next_decision_s = 1e9  # between decisions: pressure only
    plan = p.plan(view)
    check_plan(view, plan)
    assert plan.preempt == ("a",)
    assert set(plan.decode) == {"b", "c"}


def test_tokenflow_never_displaces_a_higher_priority_resident() -> None:
    # As in test_new_request_displaces_only_a_safely_preemptible_resident: the device holds one
    # request, and a resident with 3 s of buffer makes way for a new prompt of equal priority.
    for resident_priority, displaced in ((0, True), (-1, False), (1, True)):
        a = resident("a", 3.0)
        a.priority = resident_priority
        b = make_request("b", arrival=5.0, rate=2.0)
        view = make_view([a, b], total_pages=13, host=synced(a), costs=SLOW)
        plan = make_policy("tokenflow").plan(view)
        check_plan(view, plan)
        assert (plan.preempt, plan.admit) == ((("a",), ("b",)) if displaced else ((), ()))


def test_tokenflow_swaps_only_within_a_priority() -> None:
    # A preempted reader about to run dry (0.9 s) takes the place of a resident with 3.5 s
    # of buffer (see test_hysteresis_margin), unless the resident is more important.
    for resident_priority, swapped in ((0, True), (-1, False)):
        a = resident("a", 3.5)
        a.priority = resident_priority
        c = make_request("c", P, arrival=1.0, output=40, rate=2.0, buffer_s=0.9)
        view = make_view([a, c], total_pages=14, host=synced(a, c), costs=SLOW)
        plan = make_policy("tokenflow").plan(view)
        check_plan(view, plan)
        assert plan.preempt == (("a",) if swapped else ())
