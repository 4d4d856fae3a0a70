"""FCFS baseline: arrival order, newest-first recompute preemption, retract backoff."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.sched.helpers import PF, P, R, W, check_plan, make_request, make_view
from tfjax.sched.base import ResumeMode
from tfjax.sched.fcfs import FcfsPolicy
from tfjax.sched.registry import make_policy


def test_admits_in_arrival_order_and_head_blocks() -> None:
    big = make_request("big", arrival=1.0, prompt=60)
    small = make_request("small", arrival=2.0, prompt=4)
    early = make_request("early", arrival=0.5, prompt=4)
    view = make_view([small, big, early], total_pages=8, budget=100)
    plan = FcfsPolicy().plan(view)
    check_plan(view, plan)
    # early fits; big gets the rest of the pages (a partial chunk); small may not overtake.
    assert plan.admit == ("early", "big")
    assert [c.request_id for c in plan.prefill] == ["early", "big"]


def test_prefill_first_pauses_decode_and_chunked_does_not() -> None:
    running = make_request("a", R, output=2)
    new = make_request("b", arrival=1.0)
    view = make_view([running, new])
    assert FcfsPolicy().plan(view).decode == ()
    assert FcfsPolicy(chunked=True).plan(view).decode == ("a",)


def test_preempts_newest_first_and_admits_nothing_that_step() -> None:
    # Each running request sits exactly on a page boundary: its next token needs a new page.
    old = make_request("old", R, arrival=0.0, prompt=7, output=2)
    new = make_request("new", R, arrival=1.0, prompt=7, output=2)
    waiting = make_request("w", arrival=2.0, prompt=1)
    view = make_view([old, new, waiting], total_pages=4)
    assert view.num_free_pages == 0
    plan = FcfsPolicy(chunked=True).plan(view)
    check_plan(view, plan)
    assert plan.preempt == ("new",)
    assert plan.decode == ("old",)
    assert plan.admit == () and plan.resume == ()


def test_resume_by_recompute_restarts_prefill_at_zero() -> None:
    # A preempted request keeps num_computed_tokens; its recompute prefill starts from 0.
    gone = make_request("p", P, prompt=8, output=3)
    assert gone.num_computed_tokens == 10
    view = make_view([gone], budget=64)
    plan = FcfsPolicy().plan(view)
    check_plan(view, plan)
    assert [(x.request_id, x.mode) for x in plan.resume] == [("p", ResumeMode.RECOMPUTE)]
    assert [(c.request_id, c.num_tokens) for c in plan.prefill] == [("p", 10)]


def test_retract_backoff_holds_admission_after_a_preemption() -> None:
    policy = FcfsPolicy(chunked=True)
    old = make_request("old", R, prompt=7, output=2, max_tokens=200)
    new = make_request("new", R, arrival=1.0, prompt=7, output=2, max_tokens=200)
    view = make_view([old, new], total_pages=4)
    assert policy.plan(view).preempt == ("new",)
    assert policy.packer.backoff is not None and policy.packer.backoff.ratio == 0.7
    # Next step: pages are free again, but 0.7 * 198 remaining tokens of "old" are reserved.
    new.status, new.page_ids = P, []
    view = make_view([old, new], total_pages=30)
    plan = policy.plan(view)
    check_plan(view, plan)
    assert plan.resume == ()
    # Without the backoff the preempted request would come straight back.
    plain = FcfsPolicy(chunked=True, retract_backoff=False).plan(view)
    assert [x.request_id for x in plain.resume] == ["new"]
    # The reserve decays to zero over decay_steps steps.
    for _ in range(policy.packer.backoff.decay_steps):
        policy.packer.backoff.on_step(preempted=False)
    assert policy.packer.backoff.ratio == 0.0
    assert [x.request_id for x in policy.plan(view).resume] == ["new"]


def test_prefilling_requests_continue_before_new_ones() -> None:
    half = make_request("half", PF, prompt=40, computed=16)
    new = make_request("new", arrival=1.0, prompt=8)
    view = make_view([half, new], budget=30)
    plan = FcfsPolicy().plan(view)
    check_plan(view, plan)
    assert [(c.request_id, c.num_tokens) for c in plan.prefill] == [("half", 24), ("new", 6)]
    assert W is new.status and PF is half.status


@pytest.mark.parametrize("policy", ["fcfs", "fcfs-chunked", "tokenflow", "andes"])
def test_a_long_prompt_leaves_the_budget_to_short_ones_behind_it(policy: str) -> None:
    # Budget 64: without a threshold the long prompt (arrived first) takes all of it; with a
    # threshold of 32 it takes 32 tokens and the two short prompts behind it prefill alongside.
    # Slow readers (1 tok/s) and a large pool, so that tokenflow's capacity check and working
    # set bound admit all three. The long prompt is longer than what tokenflow admits per
    # decision (~430 tokens here: 6.7 budget-sized prefill steps per 0.5 s interval), so it
    # must count as the part of it the threshold lets run before the next decision.
    def plan(threshold: int) -> list[tuple[str, int]]:
        long = make_request("long", arrival=0.0, prompt=1000, rate=1.0)
        shorts = [make_request(f"s{i}", arrival=1.0 + i, prompt=12, rate=1.0) for i in range(2)]
        view = replace(
            make_view([long, *shorts], total_pages=1024, budget=64),
            long_prefill_token_threshold=threshold,
        )
        result = make_policy(policy).plan(view)
        check_plan(view, result)
        return [(c.request_id, c.num_tokens) for c in result.prefill]

    assert plan(0) == [("long", 64)]
    assert plan(32) == [("long", 32), ("s0", 12), ("s1", 12)]
    assert plan(2048) == [("long", 64)]  # a prompt under the threshold is not capped
