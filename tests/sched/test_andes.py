"""Andes: QoE formula, the 90% KV trigger, knapsack choice by gain per page, preemption cap."""

from __future__ import annotations

import pytest

from tests.sched.helpers import R, check_plan, make_request, make_view
from tfjax.sched.andes import AndesPolicy, qoe


def test_qoe() -> None:
    assert qoe(0.0, 0.0) == 1.0  # nothing expected yet
    assert qoe(10.0, 5.0) == pytest.approx(0.75)
    assert qoe(10.0, 20.0) == 1.0  # tokens ahead of the reader add nothing
    assert qoe(10.0, 0.0) == 0.0


def scene(total_pages: int):
    # "full" has read nothing of its 40-token lead (buffer 4 s): zero QoE gain.
    full = make_request("full", R, output=40, rate=10.0, buffer_s=4.0, now=10.0)
    new = make_request("new", arrival=5.0, prompt=8)
    return full, new, make_view([full, new], total_pages=total_pages, now=10.0)


def test_below_trigger_serves_everyone_fcfs() -> None:
    full, new, view = scene(total_pages=40)  # 12 of 40 pages used: 30%
    policy = AndesPolicy(solver_every_steps=1)
    plan = policy.plan(view)
    check_plan(view, plan)
    assert policy.num_solver_runs == 0
    assert plan.preempt == () and plan.admit == ("new",) and plan.decode == ("full",)


def test_above_trigger_trades_the_zero_gain_request() -> None:
    full, new, view = scene(total_pages=13)  # 12 of 13 pages used: 92%
    policy = AndesPolicy(solver_every_steps=1)
    plan = policy.plan(view)
    check_plan(view, plan)
    assert policy.num_solver_runs == 1
    assert plan.preempt == ("full",) and plan.admit == ("new",)
    assert policy.num_solver_preemptions == 1


def test_solver_runs_every_n_steps_only() -> None:
    _, _, view = scene(total_pages=13)
    policy = AndesPolicy(solver_every_steps=3)
    assert [bool(policy.plan(view).preempt) for _ in range(3)] == [False, False, True]


def test_preemption_cap() -> None:
    _, _, view = scene(total_pages=13)
    policy = AndesPolicy(solver_every_steps=1, preemption_cap=0.0)
    plan = policy.plan(view)
    assert policy.num_solver_runs == 1 and plan.preempt == ()
