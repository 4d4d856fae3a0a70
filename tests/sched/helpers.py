"""Hand-built scheduler views: requests in any state, with consistent pages and readers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tfjax.request import Request, RequestStatus, SamplingParams
from tfjax.sched.base import Costs, Plan, ResumeMode, SchedulerView

PAGE = 4
W, PF, R, P = (
    RequestStatus.WAITING,
    RequestStatus.PREFILLING,
    RequestStatus.RUNNING,
    RequestStatus.PREEMPTED,
)
COSTS = Costs(
    decode_step_s={1: 0.01, 8: 0.02, 64: 0.05},
    prefill_token_s=1e-3,
    kv_bytes_per_token=1000,
    d2h_bytes_per_s=1e9,
    h2d_bytes_per_s=1e9,
)


class FakeHost:
    def __init__(
        self,
        synced: dict[str, int] | None = None,
        free_pages: int = 10_000,
        queued: dict[str, int] | None = None,
    ) -> None:
        self.synced = dict(synced or {})
        self.queued = dict(queued or synced or {})  # copies done or in flight
        self.num_free_pages = free_pages

    def num_synced_tokens(self, request_id: str) -> int:
        return self.synced.get(request_id, 0)

    def num_queued_tokens(self, request_id: str) -> int:
        return self.queued.get(request_id, 0)


def make_request(
    rid: str,
    status: RequestStatus = W,
    *,
    arrival: float = 0.0,
    prompt: int = 8,
    output: int = 0,
    max_tokens: int = 64,
    rate: float = 10.0,
    buffer_s: float = 0.0,
    now: float = 10.0,
    computed: int | None = None,
    priority: int = 0,
    streaming: bool = True,
) -> Request:
    """A request in `status` with `output` tokens whose reader has `buffer_s` left at `now`.

    All output tokens are generated at one instant chosen so that buffer_s(now) == buffer_s
    (needs buffer_s <= output / rate); buffer_s == 0 means they were read long ago.
    """
    r = Request(
        request_id=rid,
        prompt_ids=[1] * prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_s=arrival,
        consumption_rate=rate,
        priority=priority,
        streaming=streaming,
    )
    r.output_ids = [1] * output
    if output:
        assert buffer_s <= output / rate + 1e-9, "not enough tokens for that buffer"
        t = now + buffer_s - output / rate if buffer_s > 0 else arrival
        for _ in range(output):
            r.reader.on_token(t)
    r.status = status
    if status is R:
        assert output >= 1
        r.num_computed_tokens = r.num_tokens - 1
    elif status is PF:
        r.num_computed_tokens = computed or 0
    elif status is P:
        r.num_computed_tokens = r.num_tokens - 1 if computed is None else computed
    if status in (PF, R):
        r.page_ids = list(range(1, 1 + math.ceil(r.num_computed_tokens / PAGE)))
    return r


def make_view(
    requests: Sequence[Request],
    *,
    total_pages: int = 64,
    free_pages: int | None = None,
    now: float = 10.0,
    max_batch: int = 16,
    budget: int = 64,
    host: FakeHost | None = None,
    costs: Costs = COSTS,
) -> SchedulerView:
    by = {s: [r for r in requests if r.status is s] for s in (W, PF, R, P)}
    used = sum(len(r.page_ids) for r in requests)
    assert used <= total_pages
    return SchedulerView(
        now_s=now,
        waiting=sorted(by[W], key=lambda r: r.arrival_s),
        prefilling=sorted(by[PF], key=lambda r: r.arrival_s),
        running=sorted(by[R], key=lambda r: r.arrival_s),
        preempted=sorted(by[P], key=lambda r: r.arrival_s),
        page_size=PAGE,
        num_free_pages=total_pages - used if free_pages is None else free_pages,
        num_total_pages=total_pages,
        max_batch_size=max_batch,
        prefill_token_budget=budget,
        costs=costs,
        host=host,
    )


def check_plan(view: SchedulerView, plan: Plan) -> None:
    """Assert base.py's plan contract, replaying the page books from the view alone."""
    ps = view.page_size
    everyone = {r.request_id: r for r in (*view.waiting, *view.resident, *view.preempted)}
    named = [*plan.preempt, *(x.request_id for x in plan.resume), *plan.admit]
    assert len(named) == len(set(named)), f"named twice: {plan}"
    status = {rid: r.status for rid, r in everyone.items()}
    computed = {rid: r.num_computed_tokens for rid, r in everyone.items()}
    pages = {rid: len(r.page_ids) for rid, r in everyone.items()}
    free = view.num_free_pages
    for rid in plan.preempt:
        assert status[rid] in (PF, R), f"preempt {rid} in {status[rid]}"
        free += pages[rid]
        pages[rid] = 0
        status[rid] = P
    for res in plan.resume:
        r = everyone[res.request_id]
        assert r.status is P and status[r.request_id] is P, f"resume {r.request_id}"
        if res.mode is ResumeMode.LOAD:
            assert view.host is not None
            assert view.host.num_synced_tokens(r.request_id) == r.num_computed_tokens > 0
            pages[r.request_id] = math.ceil(r.num_computed_tokens / ps)
            ready = bool(r.output_ids) and r.num_computed_tokens == r.num_prefill_target
            status[r.request_id] = R if ready else PF
        else:
            computed[r.request_id] = 0
            status[r.request_id] = PF
    for rid in plan.admit:
        assert status[rid] is W
        status[rid] = PF
    chunked = [c.request_id for c in plan.prefill]
    assert len(chunked) == len(set(chunked))
    for c in plan.prefill:
        r = everyone[c.request_id]
        assert status[c.request_id] is PF, f"chunk for {c.request_id} in {status[c.request_id]}"
        assert 1 <= c.num_tokens <= r.num_prefill_target - computed[c.request_id]
        pages[c.request_id] = max(
            pages[c.request_id], math.ceil((computed[c.request_id] + c.num_tokens) / ps)
        )
    assert len(plan.decode) == len(set(plan.decode))
    for rid in plan.decode:
        assert status[rid] is R, f"decode {rid} in {status[rid]}"
        assert rid not in plan.preempt
        pages[rid] = max(pages[rid], math.ceil(everyone[rid].num_tokens / ps))
    kept = [(rid, r) for rid, r in everyone.items() if rid not in plan.preempt]
    grown = sum(pages[rid] - len(r.page_ids) for rid, r in kept)
    assert grown <= free, f"plan allocates {grown} pages, {free} free"
    resident = [rid for rid, s in status.items() if s in (PF, R)]
    assert len(resident) <= view.max_batch_size
    assert sum(c.num_tokens for c in plan.prefill) <= view.prefill_token_budget
