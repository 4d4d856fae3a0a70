"""Hand-built scheduler views: requests in any state, with consistent pages and readers."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tfjax.request import Request, RequestStatus, SamplingParams
from tfjax.sched.base import Costs, Plan, SchedulerView, validate_plan

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
    long_prefill_token_threshold: int = 0,
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
        long_prefill_token_threshold=long_prefill_token_threshold,
    )


def check_plan(view: SchedulerView, plan: Plan) -> None:
    """base.py's plan contract, by the validator the engine runs."""
    validate_plan(view, plan)
