"""The seam between the engine and its scheduling policies.

Every engine step (and every simulator step) the owner builds a read-only `SchedulerView` and
asks the policy for a `Plan`; the KV manager then applies the plan's page operations and the
runner executes its prefill chunks and decode rows. Policies are pure Python and never import
JAX (a test enforces it), so the same objects run in the real engine and in `tfjax.sim`.

Contract of a plan (checked by `validate_plan`, which the engine runs on every plan and the
tests on generated views; a breach raises `PlanError`):
- `preempt` names resident requests (PREFILLING or RUNNING) that leave the device this step.
- `resume` names PREEMPTED requests: LOAD brings their host KV back (LOADING while the copy
  travels, possibly over several steps, then RUNNING, or PREFILLING if it was preempted
  mid-prefill), and RECOMPUTE turns them into PREFILLING requests that re-prefill their
  tokens. LOAD needs the whole host copy completed, and a policy whose `resumes_by_load` is
  False never asks for it (the engine then keeps no host copies at all). A plan may list a
  request it resumes by LOAD in `decode`: that entry is skipped until the load arrived.
- `admit` names WAITING requests that become PREFILLING.
- `prefill` gives at most one chunk per PREFILLING request (including those admitted or resumed
  by recompute in this plan); chunks are processed in order.
- `decode` names RUNNING requests that produce one token each.
- Pages: after preemptions free their pages, the free pool must cover every page the plan
  allocates: pages for loads, for prefill chunks and for decode tokens
  (`tfjax.kv.pages.extra_pages`).
A request appears at most once across preempt/resume/admit, and a preempted request is in
neither `prefill` nor `decode`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tfjax.kv.pages import pages_needed
from tfjax.request import Request, RequestStatus

WAITING, PREFILLING, RUNNING, PREEMPTED = (
    RequestStatus.WAITING,
    RequestStatus.PREFILLING,
    RequestStatus.RUNNING,
    RequestStatus.PREEMPTED,
)


class PlanError(RuntimeError):
    """A policy returned a plan that breaks this module's contract."""


class ResumeMode(enum.Enum):
    LOAD = "load"  # copy the host KV back into fresh device pages
    RECOMPUTE = "recompute"  # drop any host copy and prefill the tokens again


@dataclass(frozen=True, kw_only=True, slots=True)
class Resume:
    request_id: str
    mode: ResumeMode


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefillChunk:
    request_id: str
    num_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    preempt: tuple[str, ...] = ()
    resume: tuple[Resume, ...] = ()
    admit: tuple[str, ...] = ()
    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[str, ...] = ()
    write_through: bool = False  # copy the running requests' new full pages to the host after

    @property
    def is_empty(self) -> bool:
        return not (self.preempt or self.resume or self.admit or self.prefill or self.decode)


def context_bucket(context_tokens: float) -> int:
    """The `Costs.decode_by_context_s` bucket of rows with this mean context: the next power
    of two (contexts within 2x cost about the same; the table stays a few rows long)."""
    return 1 << max(0, math.ceil(context_tokens) - 1).bit_length()


def _interpolate(table: Mapping[int, float], batch_size: int) -> float:
    """Step time at `batch_size`, linear between measured sizes, proportional beyond them."""
    sizes = sorted(table)
    if batch_size <= sizes[0]:
        return table[sizes[0]]
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        if batch_size <= hi:
            return table[lo] + (batch_size - lo) / (hi - lo) * (table[hi] - table[lo])
    top = sizes[-1]
    return table[top] * batch_size / top


@dataclass(frozen=True, kw_only=True, slots=True)
class Costs:
    """Measured (engine) or modelled (simulator) costs the policies plan with.

    All times in seconds, bandwidths in bytes/s. `decode_step_s` maps batch size -> step time
    at whatever context the steps had (EWMA of measurements; missing sizes interpolated).
    `decode_by_context_s` keeps the same measurements apart by the rows' mean context
    (`context_bucket` -> batch size -> step time), so capacity is judged at the context a
    batch will have: a burst's first steps, at short contexts, are its cheapest.
    """

    decode_step_s: dict[int, float] = field(default_factory=dict)
    decode_by_context_s: dict[int, dict[int, float]] = field(default_factory=dict)
    prefill_token_s: float = 1e-3
    kv_bytes_per_token: int = 1
    d2h_bytes_per_s: float = 1e9
    h2d_bytes_per_s: float = 1e9
    io_backlog_s: float = 0.0  # queued, not yet finished transfers, in seconds of link time

    def decode_step_time(self, batch_size: int, context_tokens: float | None = None) -> float:
        """Step time at `batch_size` (and, if given, `context_tokens` a row): the step measured
        nearest in context and then in batch size, scaled to `batch_size` by the shape of the
        all-context table (before any measurement, a square-root guess)."""
        if not self.decode_step_s:
            return 0.02 * max(1, batch_size) ** 0.5
        step_s = _interpolate(self.decode_step_s, batch_size)
        if context_tokens is None or not self.decode_by_context_s:
            return step_s
        want = math.log2(context_bucket(context_tokens))
        bucket = min(self.decode_by_context_s, key=lambda c: (abs(math.log2(c) - want), -c))
        row = self.decode_by_context_s[bucket]
        nearest = min(row, key=lambda b: (abs(b - batch_size), -b))
        return row[nearest] * step_s / _interpolate(self.decode_step_s, nearest)

    def decode_capacity(self, batch_size: int, context_tokens: float | None = None) -> float:
        """Tokens/s the device produces at `batch_size` (Gamma in the paper's Eq. 6)."""
        return batch_size / self.decode_step_time(max(1, batch_size), context_tokens)

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens * self.prefill_token_s

    def load_s(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.h2d_bytes_per_s

    def evict_s(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.d2h_bytes_per_s


def is_decode_ready(request: Request) -> bool:
    """Has a first token and all its KV but the last token's: can decode once resident."""
    return bool(request.output_ids) and request.num_computed_tokens == request.num_prefill_target


def queue_key(request: Request) -> tuple[int, float]:
    """Serving order of every policy: lower `priority` first, ties by arrival (vLLM's rule)."""
    return (request.priority, request.arrival_s)


def buffer_s(request: Request, now_s: float) -> float:
    """Seconds of reading the request has in hand; 0 for a non-streaming request, which reads
    nothing before its last token and so is never ahead of its reader."""
    return request.reader.buffer_s(now_s) if request.streaming else 0.0


def declared_demand(requests: Iterable[Request], row_rate: float) -> float:
    """Tokens/s these readers want: the declared rates of streaming requests, and `row_rate`
    (one batch row's share of the device) for each non-streaming one, which wants its tokens
    as fast as a row makes them."""
    return sum(r.consumption_rate if r.streaming else row_rate for r in requests)


class HostView(Protocol):
    """What the host KV tier tells policies. Absent (None) when offload is switched off."""

    @property
    def num_free_pages(self) -> int: ...

    def num_synced_tokens(self, request_id: str) -> int:
        """Tokens of this request whose KV copy on the host has completed."""
        ...

    def num_queued_tokens(self, request_id: str) -> int:
        """Tokens whose host copy has completed or is in flight (>= synced)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerView:
    """A read-only snapshot for one planning call. Request lists are in arrival order."""

    now_s: float
    waiting: Sequence[Request]
    prefilling: Sequence[Request]
    running: Sequence[Request]
    preempted: Sequence[Request]
    page_size: int
    num_free_pages: int
    num_total_pages: int
    max_batch_size: int  # decode rows per step this plan may fill (LOADING ones excluded)
    prefill_token_budget: int  # prompt tokens per step
    costs: Costs
    # Tokens per prefill tile: the step computes every chunk in whole tiles, so a chunk of
    # n tokens occupies ceil(n / tile) of the step's ceil(budget / tile) tiles (1: no tiling).
    prefill_tile: int = 1
    # A prompt with more than this many tokens left gets at most this many a step (0: no cap).
    long_prefill_token_threshold: int = 0
    host: HostView | None = None
    loading: Sequence[Request] = ()  # LOADING: hold their pages, in no batch until loaded

    @property
    def resident(self) -> list[Request]:
        return [*self.prefilling, *self.running]

    @property
    def prefill_tile_budget(self) -> int:
        """Prefill tiles a step may fill: the budget's tokens as whole tiles. A plan that
        overran it would pad into a larger step bucket (about 3x the 16-tile step's time on a
        CPU for the same 512 tokens)."""
        return pages_needed(self.prefill_token_budget, self.prefill_tile)


class Policy(Protocol):
    name: str
    resumes_by_load: bool  # may plan ResumeMode.LOAD: only then is KV copied to the host

    def plan(self, view: SchedulerView) -> Plan: ...


def validate_plan(
    view: SchedulerView, plan: Plan, requests: Mapping[str, Request] | None = None
) -> None:
    """Raise `PlanError` unless `plan` keeps the contract above for `view`. Costs O(plan):
    `requests` (id -> request, the engine's table) saves building one from the view."""
    if requests is None:
        lists = (view.waiting, view.prefilling, view.running, view.preempted, view.loading)
        requests = {r.request_id: r for rs in lists for r in rs}
    books = _PlanBooks(view, requests)
    named = [*plan.preempt, *(r.request_id for r in plan.resume), *plan.admit]
    if len(set(named)) != len(named):
        raise PlanError(f"a request is named twice in preempt/resume/admit: {plan}")
    books.moves(plan)
    books.chunks(plan.prefill)
    grown = books.decode_pages(plan.decode)
    if grown > books.free:
        raise PlanError(f"the plan allocates {grown} pages, {books.free} are free")
    joined = len(plan.resume) + len(plan.admit) - len(plan.preempt)
    if len(view.prefilling) + len(view.running) + joined > view.max_batch_size:
        raise PlanError(f"more than {view.max_batch_size} resident requests")
    if sum(c.num_tokens for c in plan.prefill) > view.prefill_token_budget:
        raise PlanError(f"prefill over the budget of {view.prefill_token_budget} tokens")
    if sum(pages_needed(c.num_tokens, view.prefill_tile) for c in plan.prefill) > (
        view.prefill_tile_budget
    ):
        raise PlanError(f"prefill over the budget of {view.prefill_tile_budget} tiles")


class _PlanBooks:
    """`validate_plan`'s ledger: each request's status, computed tokens and pages after the
    plan, where the plan changes them, and the free pages after its preemptions."""

    def __init__(self, view: SchedulerView, requests: Mapping[str, Request]) -> None:
        self.view = view
        self.requests = requests
        self.status: dict[str, RequestStatus] = {}
        self.computed: dict[str, int] = {}
        self.pages: dict[str, int] = {}
        self.free = view.num_free_pages

    def get(self, request_id: str) -> Request:
        request = self.requests.get(request_id)
        if request is None:
            raise PlanError(f"{request_id}: no such live request")
        return request

    def moves(self, plan: Plan) -> None:
        """Preemptions free pages; resumes and admissions change statuses."""
        for request_id in plan.preempt:
            request = self.get(request_id)
            if request.status not in (PREFILLING, RUNNING):
                raise PlanError(f"preempt {request_id}: it is {request.status.value}")
            self.free += len(request.page_ids)
            self.status[request_id], self.pages[request_id] = PREEMPTED, 0
        for resume in plan.resume:
            request = self.get(resume.request_id)
            if request.status is not PREEMPTED:
                raise PlanError(f"resume {resume.request_id}: it is {request.status.value}")
            if resume.mode is ResumeMode.RECOMPUTE:
                self.status[request.request_id], self.computed[request.request_id] = PREFILLING, 0
                continue
            num_tokens = request.num_computed_tokens
            host = self.view.host
            if host is None or not 0 < num_tokens <= host.num_synced_tokens(request.request_id):
                raise PlanError(f"resume {request.request_id} by LOAD: no complete host copy")
            self.pages[request.request_id] = pages_needed(num_tokens, self.view.page_size)
            self.status[request.request_id] = RUNNING if is_decode_ready(request) else PREFILLING
        for request_id in plan.admit:
            request = self.get(request_id)
            if request.status is not WAITING:
                raise PlanError(f"admit {request_id}: it is {request.status.value}")
            self.status[request_id] = PREFILLING

    def chunks(self, prefill: Sequence[PrefillChunk]) -> None:
        chunked = [c.request_id for c in prefill]
        if len(set(chunked)) != len(chunked):
            raise PlanError(f"two prefill chunks for one request: {prefill}")
        for chunk in prefill:
            request = self.get(chunk.request_id)
            if self.status.get(chunk.request_id, request.status) is not PREFILLING:
                raise PlanError(f"prefill {chunk.request_id}: it is not prefilling")
            done = self.computed.get(chunk.request_id, request.num_computed_tokens)
            if not 0 < chunk.num_tokens <= request.num_prefill_target - done:
                raise PlanError(f"prefill {chunk.request_id}: bad chunk of {chunk.num_tokens}")
            need = pages_needed(done + chunk.num_tokens, self.view.page_size)
            held = self.pages.get(chunk.request_id, len(request.page_ids))
            self.pages[chunk.request_id] = max(held, need)

    def decode_pages(self, decode: Sequence[str]) -> int:
        """Pages the whole plan allocates, once the decode rows are counted."""
        if len(set(decode)) != len(decode):
            raise PlanError("a request decodes twice")
        grown = 0
        ps, pages, status = self.view.page_size, self.pages, self.status
        for request_id in decode:  # the hot loop: one row per running request
            request = self.get(request_id)
            if status.get(request_id, request.status) is not RUNNING:
                raise PlanError(f"decode {request_id}: it is not running")
            need = pages_needed(len(request.prompt_ids) + len(request.output_ids), ps)
            if request_id in pages:
                pages[request_id] = max(pages[request_id], need)
            else:
                grown += max(0, need - len(request.page_ids))
        return grown + sum(max(0, n - len(self.get(i).page_ids)) for i, n in pages.items() if n)
