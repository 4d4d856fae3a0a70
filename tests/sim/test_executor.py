"""The executor applies plans exactly per base.py's contract and rejects broken ones."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tfjax.request import Request, RequestStatus, SamplingParams
from tfjax.sched.base import Plan, PrefillChunk, Resume, ResumeMode
from tfjax.sim import Executor, PlanError, SimConfig, get_profile

PROFILE = replace(get_profile("cpu-smollm2"), page_size=4, num_device_pages=10, num_host_pages=20)
KVB = PROFILE.kv_bytes_per_token


def req(rid: str, prompt: int = 6, max_tokens: int = 3) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=[1] * prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
        arrival_s=0.0,
        consumption_rate=10.0,
    )


def setup(*requests: Request, config: SimConfig | None = None):
    return Executor(PROFILE, config), {r.request_id: r for r in requests}


def prefill(rid: str, n: int, *, admit: bool = True) -> Plan:
    return Plan(
        admit=(rid,) if admit else (), prefill=(PrefillChunk(request_id=rid, num_tokens=n),)
    )


def test_prefill_decode_finish() -> None:
    a = req("a")
    ex, reqs = setup(a)
    t = ex.execute(prefill("a", 4), reqs, 0.0)
    assert a.status is RequestStatus.PREFILLING and a.num_computed_tokens == 4
    assert len(a.page_ids) == 1 and not a.output_ids
    t = ex.execute(prefill("a", 2, admit=False), reqs, t)
    assert a.status is RequestStatus.RUNNING and a.output_ids == [1]
    assert a.reader.first_token_s == t  # the first token comes with the last prompt chunk
    t = ex.execute(Plan(decode=("a",)), reqs, t)
    t = ex.execute(Plan(decode=("a",)), reqs, t)
    assert a.status is RequestStatus.FINISHED and a.page_ids == []
    assert ex.allocator.num_used == 0 and ex.host is not None and ex.host.num_free_pages == 20
    assert len(a.reader.gen_times_s) == 3


def test_preempt_write_through_and_load() -> None:
    a = req("a", prompt=9, max_tokens=10)
    ex, reqs = setup(a)
    t = ex.execute(prefill("a", 9), reqs, 0.0)
    t = ex.execute(Plan(decode=("a",)), reqs, t)  # 10 computed: 2 full pages copied
    assert ex.host.num_synced_tokens("a") == 8
    t0 = t
    t = ex.execute(Plan(preempt=("a",)), reqs, t)
    assert a.status is RequestStatus.PREEMPTED and a.page_ids == []
    assert a.num_computed_tokens == 10 and ex.host.num_synced_tokens("a") == 10
    assert t - t0 == pytest.approx(2 * KVB / PROFILE.d2h_bytes_per_s)  # only the tail
    t0 = t
    t = ex.execute(
        Plan(resume=(Resume(request_id="a", mode=ResumeMode.LOAD),), decode=("a",)), reqs, t
    )
    assert a.status is RequestStatus.RUNNING and a.num_computed_tokens == 11
    assert len(a.page_ids) == 3
    assert t - t0 > 10 * KVB / PROFILE.h2d_bytes_per_s  # the load is on the step's clock
    assert ex.stats.num_loads == 1 and ex.stats.num_preemptions == 1


def test_recompute_refills_without_a_new_token() -> None:
    a = req("a", prompt=5, max_tokens=10)
    ex, reqs = setup(a, config=SimConfig(offload=False))
    t = ex.execute(prefill("a", 5), reqs, 0.0)
    t = ex.execute(Plan(decode=("a",)), reqs, t)
    t = ex.execute(Plan(preempt=("a",)), reqs, t)
    assert ex.host is None
    with pytest.raises(PlanError, match="without a host"):
        ex.execute(Plan(resume=(Resume(request_id="a", mode=ResumeMode.LOAD),)), reqs, t)
    resume = Plan(
        resume=(Resume(request_id="a", mode=ResumeMode.RECOMPUTE),),
        prefill=(PrefillChunk(request_id="a", num_tokens=6),),
    )
    ex.execute(resume, reqs, t)
    assert a.status is RequestStatus.RUNNING and a.num_computed_tokens == 6
    assert a.num_output_tokens == 2  # no extra token from the re-prefill
    assert ex.stats.recompute_tokens == 6


@pytest.mark.parametrize(
    "plan",
    [
        Plan(decode=("a",)),  # waiting, not running
        Plan(prefill=(PrefillChunk(request_id="a", num_tokens=1),)),  # not admitted
        Plan(admit=("a",), prefill=(PrefillChunk(request_id="a", num_tokens=7),)),  # too long
        Plan(admit=("a", "a")),
        Plan(preempt=("a",)),
        Plan(resume=(Resume(request_id="a", mode=ResumeMode.RECOMPUTE),)),
        Plan(admit=("zz",)),
    ],
)
def test_rejects_broken_plans(plan: Plan) -> None:
    ex, reqs = setup(req("a"))
    with pytest.raises(PlanError):
        ex.execute(plan, reqs, 0.0)


def test_rejects_a_plan_beyond_the_free_pages() -> None:
    big = req("big", prompt=44)
    ex, reqs = setup(big)
    with pytest.raises(PlanError, match="pages"):
        ex.execute(prefill("big", 44), reqs, 0.0)
