"""The simulator's event loop: arrivals, one `policy.plan` per step, the executor, a summary.

`simulate` runs a policy object (the same one the engine would run) over fresh `Request`
objects until every request finishes. Each iteration adds the requests that have arrived,
builds a `SchedulerView` (lists in arrival order, `Costs` from the profile at the current mean
context), asks the policy for a plan and lets the `Executor` apply it, which moves the clock to
the end of the step. An empty plan idles the device until the next arrival or for `idle_tick_s`
(a policy may be waiting for a timer); idling with nothing left to arrive for longer than
`max_idle_s` raises `SimStuckError`. Nothing here is random: with the same requests, profile
and policy parameters two runs give identical results.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tfjax.qos import TokenTimeline, summarize
from tfjax.request import Request, RequestStatus
from tfjax.sched.base import Policy, SchedulerView
from tfjax.sim.executor import Executor, SimConfig
from tfjax.sim.profiles import CostProfile

WAITING = RequestStatus.WAITING
PREFILLING = RequestStatus.PREFILLING
RUNNING = RequestStatus.RUNNING
PREEMPTED = RequestStatus.PREEMPTED


class SimStuckError(RuntimeError):
    """The policy left work undone and the device idle with nothing left to arrive."""


@dataclass(slots=True)
class SimResult:
    policy: str
    profile: str
    requests: list[Request]
    summary: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)


def simulate(
    policy: Policy,
    requests: Sequence[Request],
    profile: CostProfile,
    config: SimConfig | None = None,
    *,
    idle_tick_s: float = 0.01,
    max_idle_s: float = 60.0,
    check_every: int = 0,
) -> SimResult:
    """Run `requests` (fresh, WAITING) under `policy` on `profile` until all finish.

    `check_every` > 0 checks page books every that many steps (slow; for tests).
    """
    executor = Executor(profile, config)
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    if not pending:
        raise ValueError("no requests to simulate")
    active: dict[str, Request] = {}
    now = pending[0].arrival_s
    next_arrival = 0
    idle_since: float | None = None
    plan_s = 0.0
    costs_cache: dict[int, Any] = {}
    lists: tuple[list[Request], ...] = ()
    lists_version = -1  # executor.num_status_changes when `lists` was built
    started = time.perf_counter()
    while True:
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= now:
            r = pending[next_arrival]
            active[r.request_id] = r
            next_arrival += 1
            lists_version = -1
        if not active:
            if next_arrival >= len(pending):
                break
            now = pending[next_arrival].arrival_s
            continue
        if lists_version != executor.num_status_changes:
            lists = _by_status(active)
            lists_version = executor.num_status_changes
        view = _view(lists, now, profile, executor, costs_cache)
        t0 = time.perf_counter()
        plan = policy.plan(view)
        plan_s += time.perf_counter() - t0
        if plan.is_empty:
            if next_arrival < len(pending):
                now = min(pending[next_arrival].arrival_s, now + idle_tick_s)
                continue
            idle_since = now if idle_since is None else idle_since
            if now - idle_since > max_idle_s:
                raise SimStuckError(f"{policy.name}: {len(active)} requests left, device idle")
            now += idle_tick_s
            continue
        idle_since = None
        now = executor.execute(plan, active, now)
        for r in executor.finished:
            del active[r.request_id]
        executor.finished.clear()
        if check_every and executor.stats.num_steps % check_every == 0:
            executor.check(active.values())
    executor.check(())
    timelines = [TokenTimeline(arrival_s=r.arrival_s, reader=r.reader) for r in pending]
    stats = asdict(executor.stats)
    stats.update(
        sim_end_s=now,
        plan_s=plan_s,
        wall_s=time.perf_counter() - started,
        mean_plan_ms=1e3 * plan_s / max(1, executor.stats.num_steps),
    )
    return SimResult(
        policy=policy.name,
        profile=profile.name,
        requests=list(pending),
        summary=summarize(timelines),
        stats=stats,
    )


def _by_status(active: dict[str, Request]) -> tuple[list[Request], ...]:
    """(waiting, prefilling, running, preempted), each in arrival order."""
    waiting: list[Request] = []
    prefilling: list[Request] = []
    running: list[Request] = []
    preempted: list[Request] = []
    for r in active.values():  # insertion order is arrival order
        status = r.status
        if status is RUNNING:
            running.append(r)
        elif status is PREEMPTED:
            preempted.append(r)
        elif status is WAITING:
            waiting.append(r)
        elif status is PREFILLING:
            prefilling.append(r)
    return waiting, prefilling, running, preempted


def _view(
    lists: tuple[list[Request], ...],
    now: float,
    profile: CostProfile,
    executor: Executor,
    costs_cache: dict[int, Any],
) -> SchedulerView:
    waiting, prefilling, running, preempted = lists
    # Costs at the last decode batch's mean context, cached per 64-token bucket: the engine's
    # EWMA moves about this slowly.
    rows, context = executor.last_decode
    bucket = (context // max(1, rows)) // 64
    costs = costs_cache.get(bucket)
    if costs is None:
        costs = costs_cache[bucket] = profile.costs(bucket * 64 + 32)
    return SchedulerView(
        now_s=now,
        waiting=waiting,
        prefilling=prefilling,
        running=running,
        preempted=preempted,
        page_size=profile.page_size,
        num_free_pages=executor.allocator.num_free,
        num_total_pages=executor.allocator.num_usable,
        max_batch_size=profile.max_batch_size,
        prefill_token_budget=profile.prefill_token_budget,
        costs=costs,
        host=executor.host,
    )
