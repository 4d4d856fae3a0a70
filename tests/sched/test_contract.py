"""Every policy's plan satisfies base.py's contract, on generated views and in whole runs."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sched.helpers import PAGE, PF, FakeHost, P, R, W, check_plan, make_view
from tfjax.request import Request, SamplingParams
from tfjax.sched.base import Costs
from tfjax.sched.registry import POLICY_NAMES, make_policy
from tfjax.sim import LengthDist, WorkloadSpec, engine_config, make_requests, simulate
from tfjax.sim.profiles import CPU_SMOLLM2

NOW = 50.0


@st.composite
def requests(draw, rid: str) -> Request:
    prompt = draw(st.integers(1, 24))
    max_tokens = draw(st.integers(1, 30))
    r = Request(
        request_id=rid,
        prompt_ids=[1] * prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_s=draw(st.floats(0.0, 40.0)),
        consumption_rate=draw(st.sampled_from([1.0, 5.0, 20.0, 200.0])),
    )
    status = draw(st.sampled_from([W, PF, R, P]))
    if status is W:
        return r
    output = draw(st.integers(1 if status is R else 0, max(1, max_tokens - 1)))
    if status is R and output >= max_tokens:
        return r
    r.output_ids = [1] * output
    t = draw(st.floats(r.arrival_s, NOW))
    for _ in range(output):
        r.reader.on_token(t)
    r.status = status
    target = r.num_prefill_target
    if status is R:
        r.num_computed_tokens = target
    elif status is PF:
        r.num_computed_tokens = draw(st.integers(0, target - 1)) if target > 1 else 0
    else:
        r.num_computed_tokens = draw(st.integers(0, target))
    return r


@st.composite
def views(draw):
    reqs = [draw(requests(f"r{i}")) for i in range(draw(st.integers(1, 10)))]
    total = 60
    used = 0
    for r in reqs:
        if r.status in (PF, R):
            pages = math.ceil(r.num_computed_tokens / PAGE)
            if used + pages > total or (r.status is PF and r.num_uncomputed_prefill <= 0):
                r.status, r.num_computed_tokens, r.output_ids = W, 0, []
                r.reader = type(r.reader)(r.consumption_rate)
                continue
            r.page_ids = list(range(used + 1, used + pages + 1))
            used += pages
    total = max(4, used + draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8])))  # pressure is common
    host = None
    if draw(st.booleans()):
        host = FakeHost(
            {
                r.request_id: draw(
                    st.sampled_from([0, r.num_computed_tokens // 2, r.num_computed_tokens])
                )
                for r in reqs
            },
            free_pages=draw(st.integers(0, 100)),
        )
    step = draw(st.sampled_from([0.005, 0.05, 0.3]))
    costs = Costs(
        decode_step_s={1: step, 8: 2 * step},
        prefill_token_s=draw(st.sampled_from([1e-5, 1e-3])),
        kv_bytes_per_token=1000,
        h2d_bytes_per_s=draw(st.sampled_from([1e5, 1e9])),
    )
    residents = sum(r.status in (PF, R) for r in reqs)
    return make_view(
        reqs,
        total_pages=total,
        now=NOW,
        max_batch=max(residents, draw(st.integers(1, 8))),
        budget=draw(st.integers(1, 40)),
        host=host,
        costs=costs,
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(view=views(), between_decisions=st.booleans())
def test_plans_satisfy_the_contract(view, between_decisions: bool) -> None:
    for name in POLICY_NAMES:
        policy = make_policy(name)
        if between_decisions and name == "tokenflow":
            policy._next_decision_s = math.inf
            policy._last_arrival_s = math.inf
        check_plan(view, policy.plan(view))


TINY = replace(
    CPU_SMOLLM2,
    name="tiny",
    page_size=4,
    num_device_pages=40,
    num_host_pages=300,
    max_batch_size=6,
    prefill_token_budget=24,
)


@settings(max_examples=12, deadline=None)
@given(
    arrival=st.sampled_from(["burst", "poisson"]),
    n=st.integers(2, 14),
    seed=st.integers(0, 1000),
    host_pages=st.sampled_from([0, 8, 300]),
)
def test_whole_runs_keep_the_books(arrival: str, n: int, seed: int, host_pages: int) -> None:
    """host_pages 0: no host tier; 8: a host pool that fills up; 300: plenty."""
    spec = WorkloadSpec(
        arrival=arrival,
        num_requests=n,
        input_len=LengthDist(mean=20),
        output_len=LengthDist(mean=24),
        request_rate=4.0,
        rates="5:0.5,40:0.5",
        seed=seed,
    )
    profile = replace(TINY, num_host_pages=max(1, host_pages))
    config = engine_config(profile, offload=host_pages > 0)
    for name in POLICY_NAMES:
        # The engine raises PlanError on any contract breach; check_every audits the pages.
        result = simulate(make_policy(name), make_requests(spec), profile, config, check_every=1)
        assert result.summary["num_unstarted"] == 0
        assert all(r.num_output_tokens == r.sampling.max_tokens for r in result.requests)
