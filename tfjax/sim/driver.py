"""The simulator's driver: the real `Engine` on a virtual clock, fed arrivals on time.

`simulate` builds the engine the server builds (`tfjax.assembly`), with a `CostedRunner`
(step time from the profile) and `TimedTransfers` (host links from the profile) on one
`VirtualClock`, then loops: add the requests that have arrived, run `Engine.step`. A step
moves the clock by its modelled time; a step with nothing to run moves it to the next event
(an arrival, a copy completing) or by `idle_tick_s` (a policy may be waiting for a timer).
Idle with nothing left to arrive or copy for longer than `max_idle_s` raises
`SimStuckError`. With `replicas` > 1 the same loop runs one engine per replica, each on its
own clock, and a router picks a replica per arrival after stepping all of them up to it.
Nothing here is random (power-of-two routing draws from a seeded generator): the same
requests, profile and config give the same token timelines, and so does any token source the
runner is given (see `costed`).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tfjax.assembly import MAX_OFFLOAD_BYTES_IN_FLIGHT, assemble_engine
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.manager import PageIO
from tfjax.qos import TokenTimeline, summarize
from tfjax.request import Request
from tfjax.sched.base import Plan, Policy, SchedulerView
from tfjax.sim.clock import VirtualClock
from tfjax.sim.costed import CostedRunner, TokenSource
from tfjax.sim.profiles import CostProfile
from tfjax.sim.timed_transfer import TimedTransfers


class SimStuckError(RuntimeError):
    """The policy left work undone and the device idle with nothing left to arrive."""


@dataclass(slots=True)
class SimResult:
    policy: str
    profile: str
    requests: list[Request]
    summary: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)


def engine_config(profile: CostProfile, **overrides: Any) -> EngineConfig:
    """The engine flags a profile describes (its KV pools, batch cap, prefill budget), with
    `overrides` (any `EngineConfig` field) on top. Synthetic prompts repeat one token, so the
    prefix cache is off unless asked for."""
    page_bytes = profile.kv_bytes_per_token * profile.page_size
    base = EngineConfig(
        page_size=profile.page_size,
        num_pages=profile.num_device_pages + 1,  # + the padding page
        max_batch_size=profile.max_batch_size,
        prefill_token_budget=profile.prefill_token_budget,
        host_kv_gb=(profile.num_host_pages * page_bytes + 0.5) / 1e9,
        prefix_cache=False,
    )
    return replace(base, **overrides)


class _TimedPolicy:
    """Forwards to the policy, adds up the host time its `plan` calls take here (`plan_s`),
    and moves the virtual clock by what planning costs on the profile's machine: the step
    waits for its plan."""

    def __init__(self, policy: Policy, clock: VirtualClock, plan_s_per_request: float) -> None:
        self.policy = policy
        self.name = policy.name
        self.resumes_by_load = policy.resumes_by_load
        self.trace_fields = getattr(policy, "trace_fields", None)  # what the step trace asks
        self.plan_s = 0.0
        self._clock = clock
        self._plan_s_per_request = plan_s_per_request

    def plan(self, view: SchedulerView) -> Plan:
        start = time.perf_counter()
        plan = self.policy.plan(view)
        self.plan_s += time.perf_counter() - start
        num_requests = sum(map(len, (view.waiting, view.resident, view.preempted, view.loading)))
        self._clock.advance(self._plan_s_per_request * num_requests)
        return plan


def build_sim_engine(
    policy: Policy,
    profile: CostProfile,
    config: EngineConfig,
    clock: VirtualClock,
    tokens: TokenSource | None = None,
    page_store: PageIO | None = None,
    noise: random.Random | None = None,
) -> Engine:
    """The engine `simulate` runs: `config`'s engine on the profile's costs and links;
    `noise` draws its step costs if the profile has a `step_noise_sigma`."""
    num_pages = config.num_pages or profile.num_device_pages + 1
    pool_tokens = (num_pages - 1) * config.page_size
    runner = CostedRunner(
        profile,
        clock,
        config,
        page_size=config.page_size,
        num_pages=num_pages,
        max_model_len=min(config.max_model_len or pool_tokens, pool_tokens),
        tokens=tokens,
        page_store=page_store,
        noise=noise,
    )
    return assemble_engine(
        runner,
        runner,
        None,  # token ids only: no detokenizing
        config,
        transfers=lambda: TimedTransfers(
            clock,
            d2h_bytes_per_s=profile.d2h_bytes_per_s,
            h2d_bytes_per_s=profile.h2d_bytes_per_s,
            max_bytes_in_flight=MAX_OFFLOAD_BYTES_IN_FLIGHT,
            shares_compute=profile.host_copies_share_compute,
        ),
        emit=None,
        clock=clock,
        policy=policy,
        copies_share_compute=profile.host_copies_share_compute,
    )


class _SimRun:
    """One simulated engine on its own clock: requests go in at their arrival, `run_until`
    steps it up to a time, `finish` runs it dry."""

    def __init__(
        self,
        policy: Policy,
        profile: CostProfile,
        config: EngineConfig,
        start_s: float,
        tokens: TokenSource | None,
        page_store: PageIO | None,
        *,
        noise: random.Random,
        idle_tick_s: float,
        max_idle_s: float,
        check_every: int,
    ) -> None:
        self.clock = VirtualClock(start_s)
        self.timed = _TimedPolicy(policy, self.clock, profile.plan_s_per_request)
        self.engine = build_sim_engine(
            self.timed, profile, config, self.clock, tokens, page_store, noise
        )
        self.runner = self.engine.runner
        assert isinstance(self.runner, CostedRunner)
        links = self.engine.kv.offload.transfers if self.engine.kv.offload else None
        assert links is None or isinstance(links, TimedTransfers)
        self.links = links
        self.requests: list[Request] = []
        self._idle_tick_s, self._max_idle_s, self._check_every = (
            idle_tick_s,
            max_idle_s,
            check_every,
        )

    def add(self, request: Request) -> None:
        self.requests.append(request)
        self.engine.add_request(request)

    @property
    def num_live(self) -> int:
        return len(self.engine.requests)

    def run_until(self, t_s: float | None) -> None:
        """Step until the clock reaches `t_s` (None: until no work is left). A step that had
        nothing to run moves the clock to the next event: `t_s`, a copy completing, or the
        idle tick (a policy may wait for a timer)."""
        idle_since = None
        while t_s is None or self.clock.now_s < t_s:
            if not self.engine.has_work:
                if t_s is not None:
                    self.clock.advance_to(t_s)
                return
            if self.engine.step():
                idle_since = None
                if self._check_every and self.runner.num_steps % self._check_every == 0:
                    self.engine.check_idle()
                continue
            copy_done = self.links.next_completion_s() if self.links else None
            events = [self.clock.now_s + self._idle_tick_s]
            if t_s is not None:
                events.append(t_s)
            elif copy_done is None:
                idle_since = self.clock.now_s if idle_since is None else idle_since
                if self.clock.now_s - idle_since > self._max_idle_s:
                    name = self.timed.name
                    raise SimStuckError(f"{name}: {self.num_live} requests left")
            if copy_done is not None:
                events.append(copy_done)
            self.clock.advance_to(min(events))

    def stats(self, started: float) -> dict[str, Any]:
        engine, runner, links = self.engine, self.runner, self.links
        stats: dict[str, Any] = asdict(engine.kv.stats)
        stats.update(
            num_steps=runner.num_steps,
            busy_s=runner.busy_s,
            d2h_bytes=links.d2h.bytes_done if links else 0,
            copy_s=engine.kv.stats.copy_s,
            h2d_bytes=links.h2d.bytes_done if links else 0,
            sim_end_s=self.clock.now_s,
            plan_s=self.timed.plan_s,
            wall_s=time.perf_counter() - started,
            mean_plan_ms=1e3 * self.timed.plan_s / max(1, runner.num_steps),
        )
        return stats


ROUTES = ("round_robin", "power_of_two")


def simulate(
    policy: Policy,
    requests: Sequence[Request],
    profile: CostProfile,
    config: EngineConfig | None = None,
    *,
    tokens: TokenSource | None = None,
    page_store: PageIO | None = None,
    idle_tick_s: float = 0.01,
    max_idle_s: float = 60.0,
    check_every: int = 0,
    replicas: int = 1,
    route: str = "round_robin",
    seed: int = 0,
) -> SimResult:
    """Run `requests` (fresh, WAITING) under `policy` on `profile` until all finish.
    `config` None: `engine_config(profile)`. `check_every` > 0 audits the page books every
    that many steps (slow; for tests). `tokens` / `page_store`: another token source and the
    KV it keeps (tests run `tests/fakes.py`'s `FakeRunner` here); the timeline is the same.
    `seed` draws the step costs of a profile with a `step_noise_sigma` (one run is one draw:
    compare the median of several seeds with the median of live replays).

    `replicas` > 1: that many engines (each with its own copy of `policy`, which keeps
    state between steps) behind a router
    that sends each arrival to one of them as an existing LLM router does: `round_robin`, or
    `power_of_two` (the fewer live requests of two replicas drawn with `seed`). Every
    replica is stepped up to an arrival before the router looks at them."""
    pending = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    if not pending:
        raise ValueError("no requests to simulate")
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    if replicas > 1 and (tokens is not None or page_store is not None):
        raise ValueError("a token source or page store serves one replica")
    config = config or engine_config(profile)
    started = time.perf_counter()
    runs = [
        _SimRun(
            policy if i == 0 else copy.deepcopy(policy),
            profile,
            config,
            pending[0].arrival_s,
            tokens,
            page_store,
            noise=random.Random(f"step-noise:{seed}:{i}"),
            idle_tick_s=idle_tick_s,
            max_idle_s=max_idle_s,
            check_every=check_every,
        )
        for i in range(replicas)
    ]
    _dispatch(pending, runs, route, random.Random(seed))
    for run in runs:
        run.run_until(None)
        run.engine.check_idle()
    per_replica = [run.stats(started) for run in runs]
    stats = per_replica[0] if replicas == 1 else _sum_stats(per_replica)
    timelines = [TokenTimeline(arrival_s=r.arrival_s, reader=r.reader) for r in pending]
    return SimResult(
        policy=runs[0].timed.name,
        profile=profile.name,
        requests=pending,
        summary=summarize(timelines),
        stats=stats,
    )


def _dispatch(
    pending: Sequence[Request], runs: list[_SimRun], route: str, rng: random.Random
) -> None:
    """Hand each request, in arrival order, to the replica the router picks then."""
    for i, request in enumerate(pending):
        for run in runs:
            run.run_until(request.arrival_s)
        if route == "round_robin" or len(runs) == 1:
            target = runs[i % len(runs)]
        else:
            target = min(rng.sample(runs, 2), key=lambda run: run.num_live)
        target.add(request)


def _sum_stats(per_replica: list[dict[str, Any]]) -> dict[str, Any]:
    """Counters added over replicas, times as the latest replica's, and each replica's own."""
    latest = ("sim_end_s", "wall_s")
    total = {
        k: (max if k in latest else sum)(s[k] for s in per_replica)
        for k, v in per_replica[0].items()
        if isinstance(v, int | float)
    }
    total["mean_plan_ms"] = 1e3 * total["plan_s"] / max(1, total["num_steps"])
    total["replicas"] = per_replica
    return total


def result_json(result: SimResult) -> dict[str, Any]:
    """The result file of `tfjax simulate` (metrics as `tfjax.qos` defines them), requests
    in the order of the workload."""
    keys = ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "raw_throughput")
    summary = {k: result.summary[k] for k in (*keys, "effective_throughput", "stall_ratio")}
    summary["preemptions"] = result.stats["num_preemptions"]
    return {
        "policy": result.policy,
        "profile": result.profile,
        "summary": summary,
        "requests": [
            {"arrival_s": r.arrival_s, "token_times_s": list(r.reader.gen_times_s)}
            for r in sorted(result.requests, key=lambda r: r.request_id)  # file order
        ],
    }
