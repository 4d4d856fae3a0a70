"""The packer: turns a policy's `Decision` into the step's `Plan`, the same way for every policy.

A policy decides only order and pauses: who leaves the device now (`pause`), who leaves first
when decoding runs out of pages (`leave_order`), who comes in first (`first`), how each
preempted request comes back (`resume`), whether a step that prefills also decodes
(`prefill_first`), and whether new KV pages are copied to the host ahead of need
(`write_through`). Everything that spends the step's budgets (device pages, batch rows,
prefill tokens) is here, once, so a page-accounting fix lands in every policy at once. FCFS
is the empty decision: queue order, newest leave first, every resume a recompute.

Packing a step:
1. Pauses leave; their device pages are free at once.
2. Pressure: while the running requests need more pages to decode one token than are free,
   residents leave in `leave_order` (default: lowest priority, then newest, first), and
   nobody is brought in that step (vLLM's rule, which stops admit/preempt ping-pong).
3. Resident prefills get chunks in queue order (lower `priority`, then arrival).
4. Newcomers: `first`, then the queue (preempted and waiting, queue order). Each takes a
   row; a RECOMPUTE resume or an admission takes its first chunk (its pages and prefill
   tokens), a LOAD its whole context's pages, always leaving headroom: one page per running
   request, and the retract backoff's reserve (`RetractBackoff`) less the pages the pauses
   freed. In the queue nobody overtakes the head (strict FCFS); an entry of `first` that does
   not fit is skipped.
5. Decode rows: the running requests, and LOAD-resumed ones that are ready to decode; none
   when `prefill_first` and the step prefills.

Work-conserving by construction: a decision that pauses, reorders or picks its own pressure
victims is also packed as the plain queue order (same resume modes and prefill rule), its
floor. While the decision's plan keeps fewer requests on the device or prefills fewer tokens
than the floor, its last pauses are dropped (a pause whose replacement does not fit is a lost
row); if it still falls short, the floor is the plan. So no decision, however its policy
reasons, idles rows or prompt tokens that FCFS would use in the same state; pauses only ever
make room for as many replacements.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tfjax.kv.pages import extra_pages, pages_needed
from tfjax.request import Request, RequestStatus
from tfjax.sched.base import (
    Plan,
    PrefillChunk,
    Resume,
    ResumeMode,
    SchedulerView,
    is_decode_ready,
    queue_key,
)

_PREFILLING, _RUNNING, _PREEMPTED = (
    RequestStatus.PREFILLING,
    RequestStatus.RUNNING,
    RequestStatus.PREEMPTED,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """What a policy decides for one step; `Packer.pack` turns it into the `Plan`."""

    pause: tuple[Request, ...] = ()  # residents that leave now, to make room for `first`
    first: tuple[Request, ...] = ()  # non-residents to bring in before the queue order
    # Residents in the order they leave under page pressure (None: lowest priority, newest).
    leave_order: tuple[Request, ...] | None = None
    # How each preempted request comes back; None: not this step. Absent: RECOMPUTE.
    resume: Mapping[str, ResumeMode | None] = field(default_factory=dict)
    prefill_first: bool = True  # a step that prefills decodes nothing (SGLang's default)
    write_through: bool = False  # copy running requests' new KV pages to the host after it

    def mode(self, request: Request) -> ResumeMode | None:
        return self.resume.get(request.request_id, ResumeMode.RECOMPUTE)


@dataclass(slots=True)
class RetractBackoff:
    """SGLang's cure for admit/preempt ping-pong, without reserving outputs up front.

    Allocating pages as tokens come lets admission overcommit memory; when the running set
    then runs out of pages, the newest request is preempted, and admitting it again as soon
    as a few pages are free makes it thrash (prefill, preempt, recompute, ...). SGLang's
    scheduler answers this with `new_token_ratio`: after a retract, admission reserves that
    fraction of every resident request's remaining output (clipped at `clip_tokens`), and the
    ratio decays linearly over `decay_steps` steps. Defaults are SGLang's (0.7, 600 steps,
    4096), except that the ratio starts at 0: no reservation until memory has run out once.
    """

    ratio_after_preempt: float = 0.7
    decay_steps: int = 600
    clip_tokens: int = 4096
    ratio: float = 0.0

    def reserve_pages(self, page_size: int, residents: Iterable[Request]) -> int:
        if self.ratio <= 0.0:
            return 0
        clip = self.clip_tokens
        left = sum(min(clip, r.sampling.max_tokens - r.num_output_tokens) for r in residents)
        return math.ceil(self.ratio * left / page_size)

    def on_step(self, *, preempted: bool) -> None:
        if preempted:
            self.ratio = self.ratio_after_preempt
        elif self.ratio > 0.0:
            self.ratio = max(0.0, self.ratio - self.ratio_after_preempt / self.decay_steps)


def decode_pages_needed(requests: Iterable[Request], page_size: int) -> int:
    """Pages that decoding one token of each of `requests` allocates this step."""
    return sum(extra_pages(r, r.num_tokens, page_size) for r in requests)


@dataclass(slots=True)
class StepBudget:
    """What is left of one step's pages, prefill tokens and tiles, and rows while a plan is
    packed. Tiles as well as tokens: chunks that each end in a partial tile would otherwise
    push the step into a larger tile bucket, which computes its padding too."""

    view: SchedulerView
    free_pages: int
    rows_left: int  # requests that may still become resident (decode batch cap)
    tokens_left: int = field(init=False)
    tiles_left: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens_left = self.view.prefill_token_budget
        self.tiles_left = self.view.prefill_tile_budget

    def chunk(
        self, request: Request, *, new_resident: bool, headroom: int = 0, from_scratch: bool
    ) -> int:
        """Take the next prefill chunk of `request` if it fits; return its length (0: none).

        `from_scratch`: resumed by recompute, so its prefill restarts at token 0 (a PREEMPTED
        request still carries its old `num_computed_tokens`). A chunk is cut to the long-prefill
        threshold, and to whole pages when the free pages (less `headroom`) hold less."""
        if new_resident and self.rows_left <= 0:
            return 0
        view, ps = self.view, self.view.page_size
        computed = 0 if from_scratch else request.num_computed_tokens
        tile = view.prefill_tile
        num_tokens = min(
            request.num_prefill_target - computed, self.tokens_left, self.tiles_left * tile
        )
        if 0 < view.long_prefill_token_threshold < num_tokens:
            num_tokens = view.long_prefill_token_threshold  # leave the rest to others
        held = 0 if from_scratch else len(request.page_ids)
        room = (held + max(0, self.free_pages - headroom)) * ps - computed
        num_tokens = min(num_tokens, room)
        if num_tokens <= 0:
            return 0
        self.free_pages -= max(0, pages_needed(computed + num_tokens, ps) - held)
        self.tokens_left -= num_tokens
        self.tiles_left -= pages_needed(num_tokens, tile)
        self.rows_left -= new_resident
        return num_tokens

    def load(self, request: Request, *, headroom: int) -> bool:
        """Take a row and the pages of a LOAD resume (its whole context, and the next token's
        page if it decodes this step) if they are there."""
        ready = is_decode_ready(request)
        num_tokens = request.num_tokens if ready else request.num_computed_tokens
        pages = pages_needed(num_tokens, self.view.page_size)
        if self.rows_left <= 0 or pages + headroom > self.free_pages:
            return False
        self.free_pages -= pages
        self.rows_left -= 1
        return True


class Packer:
    """Packs every step of one policy. Keeps the retract backoff's state between steps, so
    each policy owns one (never share it)."""

    def __init__(
        self,
        *,
        headroom_pages_per_running: int = 1,
        retract_backoff: bool = True,
        swaps: bool = False,
        max_skips: int = 8,
    ) -> None:
        """`headroom_pages_per_running`: free pages admission leaves per running request, so
        the admitted prompt does not force a preemption on the very next decode step.
        `swaps`: the policy resumes preempted requests from their host copies, so where a host
        tier exists a preemption costs a copy, not a re-prefill, and does not arm the retract
        backoff (whose reserve is the cure for re-prefill thrash). `max_skips`: entries of
        `Decision.first` that may not fit before the scan of them stops (a full scan every
        step would cost O(queue) for nothing)."""
        self.headroom_pages_per_running = headroom_pages_per_running
        self.backoff = RetractBackoff() if retract_backoff else None
        self.swaps = swaps
        self.max_skips = max_skips

    def pack(self, view: SchedulerView, decision: Decision) -> Plan:
        """The decision's plan, if it keeps as many requests on the device and prefills as
        many tokens as the queue order would (its floor); else the same decision with its
        last pauses dropped until it does (a pause whose replacement does not fit is a lost
        row); else the floor's plan."""
        plan = self._pack(view, decision)
        if decision.pause or decision.first or decision.leave_order is not None:
            floor = self._pack(view, replace(decision, pause=(), first=(), leave_order=None))
            while decision.pause and _short_of(view, plan, floor):
                lost = num_resident_after(view, floor) - num_resident_after(view, plan)
                decision = replace(decision, pause=decision.pause[: -max(1, lost)])
                plan = self._pack(view, decision)
            if _short_of(view, plan, floor):
                plan = floor
        if self.backoff is not None:
            paused = {r.request_id for r in decision.pause}
            pressed = any(i not in paused for i in plan.preempt)
            self.backoff.on_step(preempted=pressed and not (self.swaps and view.host))
        return plan

    def _pack(self, view: SchedulerView, decision: Decision) -> Plan:
        ps = view.page_size
        preempt = [r.request_id for r in decision.pause]
        paused_pages = sum(len(r.page_ids) for r in decision.pause)
        free = view.num_free_pages + paused_pages
        resident = sorted((r for r in view.resident if r.request_id not in preempt), key=queue_key)
        pressured = decode_pages_needed(_running(resident), ps) > free
        if pressured:
            free = _relieve_pressure(resident, decision.leave_order, preempt, free, ps)
            resident = [r for r in resident if r.request_id not in preempt]
        running = _running(resident)
        budget = StepBudget(
            view=view,
            free_pages=free - decode_pages_needed(running, ps),
            rows_left=view.max_batch_size - len(resident),
        )
        chunks = [
            PrefillChunk(request_id=r.request_id, num_tokens=n)
            for r in resident
            if r.status is _PREFILLING
            and (n := budget.chunk(r, new_resident=False, from_scratch=False))
        ]
        decode = [r.request_id for r in running]
        resume: list[Resume] = []
        admit: list[str] = []
        if not pressured:
            headroom = self.headroom_pages_per_running * len(running)
            reserve = self.backoff.reserve_pages(ps, resident) if self.backoff else 0
            # The backoff holds back what takes free pages; the room a pause makes is exempt
            # (a one-for-one replacement commits no more memory than it frees).
            headroom_first = headroom + max(0, reserve - paused_pages)
            newcomers = _Newcomers(budget, decision, headroom_first, chunks, decode, resume, admit)
            newcomers.bring(decision.first, strict=False, max_skips=self.max_skips)
            newcomers.headroom = headroom + reserve
            queue = sorted([*view.preempted, *view.waiting], key=queue_key)
            newcomers.bring(queue, strict=True, max_skips=0)
        return Plan(
            preempt=tuple(preempt),
            resume=tuple(resume),
            admit=tuple(admit),
            prefill=tuple(chunks),
            decode=() if decision.prefill_first and chunks else tuple(decode),
            write_through=decision.write_through,
        )


def _running(requests: Iterable[Request]) -> list[Request]:
    return [r for r in requests if r.status is _RUNNING]


def _relieve_pressure(
    resident: Sequence[Request],
    leave_order: Sequence[Request] | None,
    preempt: list[str],
    free: int,
    page_size: int,
) -> int:
    """Step 2: preempt residents (appended to `preempt`) in `leave_order` (None: the queue
    order's last first) until the running ones can decode; returns the free pages then."""
    need = decode_pages_needed(_running(resident), page_size)
    for victim in reversed(resident) if leave_order is None else leave_order:
        if need <= free:
            break
        if victim.request_id in preempt or victim.status not in (_PREFILLING, _RUNNING):
            continue
        preempt.append(victim.request_id)
        free += len(victim.page_ids)
        if victim.status is _RUNNING:
            need -= extra_pages(victim, victim.num_tokens, page_size)
    return free


@dataclass(slots=True)
class _Newcomers:
    """Step 4 of packing: brings requests in while the budget lasts, into the plan's lists."""

    budget: StepBudget
    decision: Decision
    headroom: int
    chunks: list[PrefillChunk]
    decode: list[str]
    resume: list[Resume]
    admit: list[str]
    seen: set[str] = field(default_factory=set)

    def bring(self, requests: Sequence[Request], *, strict: bool, max_skips: int) -> None:
        """In order; `strict`: stop at the first that does not fit, else skip up to
        `max_skips` of them."""
        skips = 0
        for r in requests:
            if r.request_id in self.seen:
                continue
            if self.budget.rows_left <= 0:
                return
            if self._one(r):
                self.seen.add(r.request_id)
            elif strict or (skips := skips + 1) >= max_skips:
                return

    def _one(self, r: Request) -> bool:
        if r.status is not _PREEMPTED:
            n = self.budget.chunk(r, new_resident=True, headroom=self.headroom, from_scratch=False)
            if n:
                self.chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
                self.admit.append(r.request_id)
            return bool(n)
        mode = self.decision.mode(r)
        if mode is None:  # its host copy is still in flight: it comes back next step
            return False
        if mode is ResumeMode.LOAD:
            if not self.budget.load(r, headroom=self.headroom):
                return False
            if is_decode_ready(r):
                self.decode.append(r.request_id)
        else:
            n = self.budget.chunk(r, new_resident=True, headroom=self.headroom, from_scratch=True)
            if not n:
                return False
            self.chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
        self.resume.append(Resume(request_id=r.request_id, mode=mode))
        return True


def _short_of(view: SchedulerView, plan: Plan, floor: Plan) -> bool:
    """Does `plan` keep fewer requests on the device, or prefill fewer tokens, than `floor`?"""
    return num_resident_after(view, plan) < num_resident_after(view, floor) or (
        prefill_tokens(plan) < prefill_tokens(floor)
    )


def num_resident_after(view: SchedulerView, plan: Plan) -> int:
    """Requests holding a row once `plan` is applied (LOAD resumes included)."""
    joined = len(plan.resume) + len(plan.admit) - len(plan.preempt)
    return len(view.prefilling) + len(view.running) + joined


def prefill_tokens(plan: Plan) -> int:
    return sum(c.num_tokens for c in plan.prefill)


class PackingPolicy:
    """The base of every policy: it decides, its own `Packer` packs."""

    name: str
    resumes_by_load: bool = False  # may decide ResumeMode.LOAD: only then is KV on the host

    def __init__(self, packer: Packer | None = None) -> None:
        self.packer = packer or Packer()

    def decide(self, view: SchedulerView) -> Decision:
        raise NotImplementedError

    def plan(self, view: SchedulerView) -> Plan:
        return self.packer.pack(view, self.decide(view))
