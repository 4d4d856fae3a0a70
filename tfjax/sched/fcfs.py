"""First-come-first-served continuous batching: the SGLang-style baseline.

Requests are served in arrival order, or by `priority` first when requests carry one (vLLM's
priority scheduling: lower value first, ties by arrival; `base.queue_key`). Pages are
allocated as tokens are generated (no reservation of the whole output), and a request is
preempted only when the running set needs a page that does not exist: the last resident in
that order (lowest priority, then newest) goes first, by recompute, and nothing is admitted or
resumed in a step that preempted (vLLM's rule, which stops admit/preempt
ping-pong). Preempted requests come back before newer waiting ones because they arrived first.

Two variants, as in the paper's baselines:
- `fcfs` (prefill-first, SGLang's default): while prompt work is pending, steps run prefill
  only, up to the prefill token budget; running streams pause meanwhile.
- `fcfs-chunked` (SGLang with chunked prefill mixed into decode): every step decodes all
  running requests and spends the prefill token budget on pending prompts alongside.

Admission keeps `headroom_pages_per_running` free pages per running request (default 1) so
that the admitted prompt does not force a preemption on the very next decode step. vLLM's
rule alone only delays the ping-pong by a step: the preempted request is the newest, so it is
readmitted as soon as its pages are free and preempted again a few steps later, re-prefilling
each time. `RetractBackoff` (SGLang's new_token_ratio, on by default) stops that: after a
preemption, admission also reserves a decaying share of the residents' remaining outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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

# How a preempted request comes back (None: not this step); FCFS alone always recomputes.
ResumeChooser = Callable[[SchedulerView, Request], ResumeMode | None]


@dataclass(slots=True)
class PrefillFiller:
    """Packs prefill chunks into what is left of one step's token budget, pages and rows.

    Shared by the policies: each picks the order, this does the arithmetic.
    """

    view: SchedulerView
    free_pages: int
    tokens_left: int
    rows_left: int  # requests that may still become resident (decode batch cap)

    def try_add(
        self,
        request: Request,
        *,
        new_resident: bool,
        reserve_pages: int = 0,
        from_scratch: bool = False,
    ) -> int:
        """Plan the next chunk of `request` if it fits; return its length (0 if none fits).

        `from_scratch`: the request is being resumed by recompute, so its prefill restarts at
        token 0 (a PREEMPTED request still carries its old `num_computed_tokens`).
        """
        if new_resident and self.rows_left <= 0:
            return 0
        computed = 0 if from_scratch else request.num_computed_tokens
        num_tokens = min(request.num_prefill_target - computed, self.tokens_left)
        if 0 < self.view.long_prefill_token_threshold < num_tokens:
            num_tokens = self.view.long_prefill_token_threshold  # leave the rest to others
        if num_tokens <= 0:
            return 0
        pages = self.view.pages_for(request, computed + num_tokens)
        if pages + reserve_pages > self.free_pages:
            # Fit a shorter chunk into the pages there are, whole pages only.
            spare = self.free_pages - reserve_pages - self.view.pages_for(request, 0)
            capacity = (len(request.page_ids) + max(0, spare)) * self.view.page_size
            num_tokens = min(num_tokens, capacity - computed)
            if num_tokens <= 0:
                return 0
            pages = self.view.pages_for(request, computed + num_tokens)
        self.free_pages -= pages
        self.tokens_left -= num_tokens
        if new_resident:
            self.rows_left -= 1
        return num_tokens


def decode_pages_needed(view: SchedulerView, requests: list[Request]) -> int:
    """Pages that decoding one token of each of `requests` allocates this step."""
    ps = view.page_size  # view.pages_for(r, r.num_tokens), inlined: runs every step
    return sum(
        max(0, -(-(len(r.prompt_ids) + len(r.output_ids)) // ps) - len(r.page_ids))
        for r in requests
    )


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

    def reserve_pages(self, view: SchedulerView, residents: Iterable[Request]) -> int:
        if self.ratio <= 0.0:
            return 0
        clip = self.clip_tokens
        left = sum(min(clip, r.sampling.max_tokens - r.num_output_tokens) for r in residents)
        return math.ceil(self.ratio * left / view.page_size)

    def on_step(self, *, preempted: bool) -> None:
        if preempted:
            self.ratio = self.ratio_after_preempt
        elif self.ratio > 0.0:
            self.ratio = max(0.0, self.ratio - self.ratio_after_preempt / self.decay_steps)


class FcfsPolicy:
    resumes_by_load = False  # always recomputes

    def __init__(
        self,
        *,
        chunked: bool = False,
        headroom_pages_per_running: int = 1,
        retract_backoff: bool = True,
        resume_mode: ResumeChooser | None = None,
    ) -> None:
        self.chunked = chunked
        self.resume_mode = resume_mode
        self.headroom_pages_per_running = headroom_pages_per_running
        self.backoff = RetractBackoff() if retract_backoff else None
        self.name = "fcfs-chunked" if chunked else "fcfs"

    def plan(self, view: SchedulerView) -> Plan:
        resident = sorted([*view.prefilling, *view.running], key=queue_key)
        free = view.num_free_pages
        preempt: list[str] = []
        # Preempt from the back of the queue order until every remaining running request can decode.
        need = decode_pages_needed(view, [r for r in resident if r.status is RequestStatus.RUNNING])
        while resident and need > free:
            victim = resident.pop()
            preempt.append(victim.request_id)
            free += len(victim.page_ids)
            if victim.status is RequestStatus.RUNNING:
                need -= view.pages_for(victim, victim.num_tokens)
        running = [r for r in resident if r.status is RequestStatus.RUNNING]
        prefilling = [r for r in resident if r.status is not RequestStatus.RUNNING]
        free -= need
        filler = PrefillFiller(
            view=view,
            free_pages=free,
            tokens_left=view.prefill_token_budget,
            rows_left=view.max_batch_size - len(resident),
        )
        chunks = [
            PrefillChunk(request_id=r.request_id, num_tokens=n)
            for r in prefilling
            if (n := filler.try_add(r, new_resident=False))
        ]
        resume: list[Resume] = []
        admit: list[str] = []
        if not preempt and (view.preempted or view.waiting):
            headroom = self.headroom_pages_per_running * len(running)
            if self.backoff is not None:
                headroom += self.backoff.reserve_pages(view, resident)
            for request in sorted([*view.preempted, *view.waiting], key=queue_key):
                recompute = request.status is RequestStatus.PREEMPTED
                mode = self.resume_mode(view, request) if recompute and self.resume_mode else None
                if mode is ResumeMode.LOAD:
                    if not self._load(view, filler, request, headroom):
                        break
                    resume.append(Resume(request_id=request.request_id, mode=mode))
                    if is_decode_ready(request):
                        running.append(request)
                    continue
                if recompute and self.resume_mode and mode is None:
                    break  # its host copy is still in flight: it comes back next step
                n = filler.try_add(
                    request, new_resident=True, reserve_pages=headroom, from_scratch=recompute
                )
                if not n:
                    break  # strict FCFS: nobody overtakes the head of the queue
                chunks.append(PrefillChunk(request_id=request.request_id, num_tokens=n))
                if recompute:
                    resume.append(Resume(request_id=request.request_id, mode=ResumeMode.RECOMPUTE))
                else:
                    admit.append(request.request_id)
        if self.backoff is not None:
            self.backoff.on_step(preempted=bool(preempt))
        # A LOAD-resumed decode-ready request decodes in the step that loads it.
        decode = [r.request_id for r in running]
        if chunks and not self.chunked:
            decode = []  # prefill-first: running streams wait for the prompts
        return Plan(
            preempt=tuple(preempt),
            resume=tuple(resume),
            admit=tuple(admit),
            prefill=tuple(chunks),
            decode=tuple(decode),
        )

    @staticmethod
    def _load(view: SchedulerView, filler: PrefillFiller, request: Request, headroom: int) -> bool:
        """Take pages and a row for a LOAD resume (its whole context, plus the next token's
        page if it decodes this step) if they are there."""
        num_tokens = request.num_tokens if is_decode_ready(request) else request.num_computed_tokens
        pages = -(-num_tokens // view.page_size)
        if filler.rows_left <= 0 or pages + headroom > filler.free_pages:
            return False
        filler.free_pages -= pages
        filler.rows_left -= 1
        return True
