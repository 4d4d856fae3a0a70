"""Applies a `Plan` to `Request` objects as the engine would, and returns the step's duration.

`Executor.execute` is the simulator's stand-in for `KVManager.execute` + `Runner.step`: it checks
the plan against base.py's contract (raising `PlanError`), moves device pages with the real
`PageAllocator`, keeps a host tier model (`HostModel`, a `HostView`), and charges time from a
`CostProfile`. Order within a step: preempt, resume, admit, prefill chunks, decode.

Time of one step = blocking transfers + compute. Blocking transfers are the unsynced tails of
preempted requests (D2H) and the KV of LOAD resumes (H2D); with `overlap` (load-evict overlap,
paper §5.3) they run concurrently, else back to back. Write-through copies the full pages of
resident requests to the host during the compute, up to what the D2H link moves in that time,
largest buffers first (paper §5.2), so a preemption only pays for the partial last page. A
host pool too full for a preempted request's tail drops its copy: it must recompute.

Tokens produced by a step are stamped with the step's end time and fed to `request.reader`.
A request that completes its prompt prefill gets its first token; one that completes a
recompute re-prefill gets none (its last token is already sampled). A request stops at
`sampling.max_tokens` output tokens (the simulator forces the output length).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tfjax.kv.pages import OutOfPagesError, PageAllocator
from tfjax.request import FinishReason, Request, RequestStatus
from tfjax.sched.base import Plan, ResumeMode
from tfjax.sim.profiles import CostProfile

_TOKEN = 1  # the simulator does not model token ids

WAITING = RequestStatus.WAITING
PREFILLING = RequestStatus.PREFILLING
RUNNING = RequestStatus.RUNNING
PREEMPTED = RequestStatus.PREEMPTED


class PlanError(ValueError):
    """The policy returned a plan that breaks base.py's contract."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    """The KV-tier switches of the paper's ablation (Table 2)."""

    offload: bool = True  # host tier exists: preempted KV can be kept and loaded back
    write_through: bool = True  # sync new KV to the host during compute
    overlap: bool = True  # evictions and loads of one step run concurrently


class HostModel:
    """Pinned-host KV pool: per-request synced-token watermark, page-granular capacity."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.synced: dict[str, int] = {}  # request id -> tokens whose copy is complete
        self._used = 0

    @property
    def num_free_pages(self) -> int:
        return self.num_pages - self._used

    def num_synced_tokens(self, request_id: str) -> int:
        return self.synced.get(request_id, 0)

    def num_queued_tokens(self, request_id: str) -> int:
        """Copies complete when queued here (their time is charged to the step)."""
        return self.num_synced_tokens(request_id)

    def sync(self, request_id: str, num_tokens: int) -> bool:
        """Raise the watermark to `num_tokens`; False (and no change) if the pool is full."""
        old = self.synced.get(request_id, 0)
        extra = -(-num_tokens // self.page_size) - -(-old // self.page_size)
        if extra > self.num_free_pages:
            return False
        self._used += extra
        self.synced[request_id] = num_tokens
        return True

    def drop(self, request_id: str) -> None:
        old = self.synced.pop(request_id, 0)
        self._used -= -(-old // self.page_size)


@dataclass(slots=True)
class ExecutorStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_loads: int = 0
    num_recomputes: int = 0
    recompute_tokens: int = 0
    prefill_tokens: int = 0
    d2h_bytes: int = 0
    h2d_bytes: int = 0
    blocking_io_s: float = 0.0  # transfer time added to steps
    write_through_s: float = 0.0  # link time hidden under compute
    compute_s: float = 0.0


class Executor:
    def __init__(self, profile: CostProfile, config: SimConfig | None = None) -> None:
        self.profile = profile
        self.config = config or SimConfig()
        self.allocator = PageAllocator(profile.num_device_pages + 1)  # + the pad page
        self.host = (
            HostModel(profile.num_host_pages, profile.page_size) if self.config.offload else None
        )
        self.stats = ExecutorStats()
        self.num_status_changes = 0  # lets the loop reuse its status lists between steps
        self.finished: list[Request] = []  # since the loop last collected them
        self.last_decode = (0, 0)  # (rows, context tokens) of the last step, for `Costs`
        self._behind: dict[str, Request] = {}  # residents with KV not yet on the host

    def pages_for(self, request: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.profile.page_size) - len(request.page_ids))

    def execute(self, plan: Plan, requests: dict[str, Request], now_s: float) -> float:
        """Apply `plan`; return the simulated time at which the step ends."""
        p = self.profile
        get = _getter(requests)
        _check_unique(plan)
        evict_tokens = 0
        for rid in plan.preempt:
            r = get(rid)
            if r.status not in (PREFILLING, RUNNING):
                raise PlanError(f"preempt {rid}: status {r.status.value}")
            evict_tokens += self._evict(r)
        load_tokens = 0
        for res in plan.resume:
            r = get(res.request_id)
            if r.status is not PREEMPTED:
                raise PlanError(f"resume {r.request_id}: status {r.status.value}")
            if res.mode is ResumeMode.LOAD:
                load_tokens += self._load(r)
            else:
                self.stats.num_recomputes += 1
                self.stats.recompute_tokens += r.num_computed_tokens
                if self.host is not None:
                    self.host.drop(r.request_id)
                r.num_computed_tokens = 0
                r.status = PREFILLING
        for rid in plan.admit:
            r = get(rid)
            if r.status is not WAITING:
                raise PlanError(f"admit {rid}: status {r.status.value}")
            r.status = PREFILLING
        num_prefill = 0
        completed: list[Request] = []
        for chunk in plan.prefill:
            r = get(chunk.request_id)
            if r.status is not PREFILLING:
                raise PlanError(f"prefill {r.request_id}: status {r.status.value}")
            end = r.num_computed_tokens + chunk.num_tokens
            if chunk.num_tokens < 1 or end > r.num_prefill_target:
                raise PlanError(f"prefill {r.request_id}: bad chunk of {chunk.num_tokens}")
            self._allocate(r, end)
            r.num_computed_tokens = end
            num_prefill += chunk.num_tokens
            if end == r.num_prefill_target:
                completed.append(r)
        decoding: list[Request] = []
        context = 0
        ps = p.page_size
        behind = self._behind
        for rid in plan.decode:
            r = get(rid)
            # RUNNING now: RUNNING when planned (not preempted) or just loaded. Requests that
            # complete their prefill in this step become RUNNING only after it.
            if r.status is not RUNNING:
                raise PlanError(f"decode {rid}: status {r.status.value}")
            n = len(r.prompt_ids) + len(r.output_ids)  # r.num_tokens, inlined: hot loop
            if n > len(r.page_ids) * ps:
                self._allocate(r, n)
                behind[rid] = r  # its previous pages are full: write-through can copy them
            decoding.append(r)
            context += n

        io = self._io_s(evict_tokens * p.kv_bytes_per_token, load_tokens * p.kv_bytes_per_token)
        compute = p.step_s(
            num_decode=len(decoding), context_tokens=context, num_prefill=num_prefill
        )
        end_s = now_s + io + compute
        st = self.stats
        st.num_steps += 1
        st.blocking_io_s += io
        st.compute_s += compute
        st.prefill_tokens += num_prefill

        self.last_decode = (len(decoding), context)
        if plan.preempt or plan.resume or plan.admit or completed:
            self.num_status_changes += 1
        for r in completed:
            r.status = RUNNING
            if not r.output_ids:
                self._emit(r, end_s)
        for r in decoding:  # _emit, inlined: hot loop
            r.num_computed_tokens += 1
            r.output_ids.append(_TOKEN)
            r.reader.on_token(end_s)
            if len(r.output_ids) >= r.sampling.max_tokens:
                self._finish(r)
        if self.host is not None and self.config.write_through:
            behind.update((c.request_id, requests[c.request_id]) for c in plan.prefill)
            self._write_through(compute, end_s)
        return end_s

    def _allocate(self, r: Request, num_tokens: int) -> None:
        n = self.pages_for(r, num_tokens)
        if n:
            try:
                r.page_ids.extend(self.allocator.allocate(n))
            except OutOfPagesError as e:
                raise PlanError(f"{r.request_id}: {e}") from None

    def _free(self, r: Request) -> None:
        self.allocator.free(r.page_ids)
        r.page_ids = []

    def _evict(self, r: Request) -> int:
        """Preempt `r`; return the tokens that must cross the link before its pages are free."""
        tail = 0
        if self.host is not None:
            synced = self.host.num_synced_tokens(r.request_id)
            if self.host.sync(r.request_id, r.num_computed_tokens):
                tail = r.num_computed_tokens - synced
            else:
                self.host.drop(r.request_id)  # no room: the request will have to recompute
        self._free(r)
        r.status = PREEMPTED
        r.num_preemptions += 1
        self.stats.num_preemptions += 1
        return tail

    def _load(self, r: Request) -> int:
        if self.host is None:
            raise PlanError(f"resume {r.request_id} by LOAD without a host tier")
        if r.num_computed_tokens == 0 or (
            self.host.num_synced_tokens(r.request_id) != r.num_computed_tokens
        ):
            raise PlanError(f"resume {r.request_id} by LOAD: host copy incomplete")
        self._allocate(r, r.num_computed_tokens)
        # A request preempted in the middle of its prefill goes back to prefilling.
        r.status = RUNNING if r.num_uncomputed_prefill == 0 and r.output_ids else PREFILLING
        self.stats.num_loads += 1
        return r.num_computed_tokens

    def _io_s(self, d2h_bytes: int, h2d_bytes: int) -> float:
        p = self.profile
        self.stats.d2h_bytes += d2h_bytes
        self.stats.h2d_bytes += h2d_bytes
        d2h = d2h_bytes / p.d2h_bytes_per_s
        h2d = h2d_bytes / p.h2d_bytes_per_s
        return max(d2h, h2d) if self.config.overlap else d2h + h2d

    def _emit(self, r: Request, t: float) -> None:
        r.output_ids.append(_TOKEN)
        r.reader.on_token(t)
        if r.num_output_tokens >= r.sampling.max_tokens:
            self._finish(r)

    def _finish(self, r: Request) -> None:
        self.num_status_changes += 1
        self.finished.append(r)
        r.status = RequestStatus.FINISHED
        r.finish_reason = FinishReason.LENGTH
        self._free(r)
        if self.host is not None:
            self.host.drop(r.request_id)

    def _write_through(self, compute_s: float, now_s: float) -> None:
        """Copy full pages of resident requests to the host, within the step's link budget.

        Like the engine, only full pages are copied: a preemption copies the partial last page.
        `_behind` holds residents that may have uncopied full pages; largest buffers first
        when the budget cannot take them all.
        """
        host = self.host
        assert host is not None
        ps = self.profile.page_size
        kvb = self.profile.kv_bytes_per_token
        budget = int(compute_s * self.profile.d2h_bytes_per_s / kvb)  # tokens the link can move
        synced = host.synced
        behind = [r for r in self._behind.values() if r.status is RUNNING or r.status is PREFILLING]
        total = sum(r.num_computed_tokens // ps * ps - synced.get(r.request_id, 0) for r in behind)
        if total > budget:
            behind.sort(key=lambda r: r.reader.buffer_s(now_s), reverse=True)
        self._behind = {}
        moved = 0
        for r in behind:
            done = synced.get(r.request_id, 0)
            full = r.num_computed_tokens // ps * ps
            target = min(full, done + (budget - moved) // ps * ps)
            if target > done and host.sync(r.request_id, target):
                moved += target - done
            if full > synced.get(r.request_id, 0):
                self._behind[r.request_id] = r  # try again after the next step
        self.stats.d2h_bytes += moved * kvb
        self.stats.write_through_s += moved * kvb / self.profile.d2h_bytes_per_s

    def check(self, requests: Iterable[Request]) -> None:
        """Raise AssertionError if device pages and request page lists disagree."""
        self.allocator.check()
        held = sum(len(r.page_ids) for r in requests)
        assert held == self.allocator.num_used, (
            f"requests hold {held}, allocator {self.allocator.num_used}"
        )
        for r in requests:
            if r.status in (PREFILLING, RUNNING):
                assert len(r.page_ids) == math.ceil(r.num_computed_tokens / self.profile.page_size)


def _getter(requests: dict[str, Request]):
    def get(rid: str) -> Request:
        try:
            return requests[rid]
        except KeyError:
            raise PlanError(f"unknown request {rid}") from None

    return get


def _check_unique(plan: Plan) -> None:
    moved = [*plan.preempt, *(r.request_id for r in plan.resume), *plan.admit]
    if len(set(moved)) != len(moved):
        raise PlanError("a request appears twice across preempt/resume/admit")
    chunks = [c.request_id for c in plan.prefill]
    if len(set(chunks)) != len(chunks):
        raise PlanError("two prefill chunks for one request")
    if len(set(plan.decode)) != len(plan.decode):
        raise PlanError("a request decodes twice")
    preempted = set(plan.preempt)
    if preempted & (set(chunks) | set(plan.decode)):
        raise PlanError("a preempted request is in prefill or decode")
