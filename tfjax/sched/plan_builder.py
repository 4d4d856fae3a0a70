"""`assemble_plan`: turns a policy's decision (who leaves, who comes in, in which order) into a
`Plan` that satisfies the contract in `tfjax.sched.base`: page budget, batch rows, prefill
token budget, one chunk per prefilling request, pressure preemptions when decode needs pages.

Shared by the buffer-aware policies (`tokenflow`, `andes`); each decides, this does the
arithmetic, so a page-accounting fix lands in every policy at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tfjax.request import Request, RequestStatus
from tfjax.sched.base import (
    Plan,
    PrefillChunk,
    Resume,
    ResumeMode,
    SchedulerView,
    is_decode_ready,
)
from tfjax.sched.fcfs import PrefillFiller, decode_pages_needed

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED


def assemble_plan(
    view: SchedulerView,
    *,
    victims: Sequence[Request] = (),
    bring: Callable[[], Sequence[Request]] = tuple,
    pressure_order: Callable[[list[Request]], list[Request]],
    choose_mode: Callable[[Request], ResumeMode | None],
    reserve_pages: Callable[[list[Request]], int] = len,
    prefill_first: bool = False,
    max_misses: int = 8,
) -> Plan:
    """Turn a decision into a plan that satisfies base.py's contract.

    `victims` are preempted first. If the remaining RUNNING requests still need more pages than
    are free, residents are preempted in `pressure_order` until they fit, and then nothing is
    brought in this step (vLLM's rule). Otherwise PREFILLING requests get chunks in arrival
    order, and `bring()` (called only if rows and pages are left) lists PREEMPTED and WAITING
    requests to resume (mode from `choose_mode`; None: not now) or admit. A newcomer must fit
    whole (its prompt or context, not just a first chunk) on top of `reserve_pages(running)`
    (default: one page per running request) and of the pages resident prefills still need;
    after `max_misses` newcomers that do not fit the scan stops (a full scan every step costs
    O(preempted) for nothing). LOAD-resumed decode-ready requests decode in the same step.
    With `prefill_first`, a step that prefills a prompt of a request with no first token yet
    decodes nothing.
    """
    victim_ids = {r.request_id for r in victims}
    preempt = [r.request_id for r in victims]
    free = view.num_free_pages + sum(len(r.page_ids) for r in victims)
    resident = [r for r in view.resident if r.request_id not in victim_ids]
    running = [r for r in resident if r.status is _RUNNING]
    need = decode_pages_needed(view, running)
    pressured = need > free
    if pressured:
        for victim in pressure_order(resident):
            if need <= free:
                break
            preempt.append(victim.request_id)
            free += len(victim.page_ids)
            if victim.status is _RUNNING:
                need -= view.pages_for(victim, victim.num_tokens)
        gone = set(preempt)
        resident = [r for r in resident if r.request_id not in gone]
        running = [r for r in resident if r.status is _RUNNING]
    filler = PrefillFiller(
        view=view,
        free_pages=free - need,
        tokens_left=view.prefill_token_budget,
        rows_left=view.max_batch_size - len(resident),
    )
    ps = view.page_size
    chunks: list[PrefillChunk] = []
    prefilling_now: list[Request] = []
    unfinished = 0  # pages that resident prefills still need after this step's chunks
    for r in resident:
        if r.status is _RUNNING:
            continue
        if n := filler.try_add(r, new_resident=False):
            chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
            prefilling_now.append(r)
        unfinished += -(-r.num_prefill_target // ps) - -(-(r.num_computed_tokens + n) // ps)
    decode = [r.request_id for r in running]
    resume: list[Resume] = []
    admit: list[str] = []
    reserve = reserve_pages(running) + unfinished
    misses = 0
    if not pressured and filler.rows_left > 0 and filler.free_pages > reserve:
        for r in bring():
            if filler.rows_left <= 0 or filler.free_pages <= reserve or misses >= max_misses:
                break
            # Newcomers must fit whole (their whole prompt or context), not just a first chunk:
            # a prompt admitted into pages it cannot finish in forces a preemption later.
            ready = r.status is _PREEMPTED and is_decode_ready(r)
            whole = -(-(r.num_tokens if ready else r.num_prefill_target) // ps)
            mode = None
            if whole + reserve <= filler.free_pages:
                mode = choose_mode(r) if r.status is _PREEMPTED else ResumeMode.RECOMPUTE
            if mode is ResumeMode.LOAD:
                filler.free_pages -= whole if ready else -(-r.num_computed_tokens // ps)
                filler.rows_left -= 1
                if ready:
                    decode.append(r.request_id)
                resume.append(Resume(request_id=r.request_id, mode=mode))
            elif mode is ResumeMode.RECOMPUTE and (
                n := filler.try_add(
                    r,
                    new_resident=True,
                    reserve_pages=reserve,
                    from_scratch=r.status is _PREEMPTED,
                )
            ):
                reserve += -(-r.num_prefill_target // ps) - -(-n // ps)
                chunks.append(PrefillChunk(request_id=r.request_id, num_tokens=n))
                if r.status is _PREEMPTED:
                    resume.append(Resume(request_id=r.request_id, mode=mode))
                else:
                    admit.append(r.request_id)
            else:
                misses += 1
    if prefill_first and (admit or any(not r.output_ids for r in prefilling_now)):
        decode = []
    return Plan(
        preempt=tuple(preempt),
        resume=tuple(resume),
        admit=tuple(admit),
        prefill=tuple(chunks),
        decode=tuple(decode),
    )
