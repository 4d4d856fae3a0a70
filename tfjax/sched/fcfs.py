"""First-come-first-served continuous batching: the SGLang-style baseline.

Requests are served in arrival order. Pages are allocated as tokens are generated (no
reservation of the whole output), and a request is preempted only when the running set needs
a page that does not exist: the newest resident request goes first, by recompute, and nothing
is admitted or resumed in a step that preempted (vLLM's rule, which stops admit/preempt
ping-pong). Preempted requests come back before newer waiting ones because they arrived first.

Two variants, as in the paper's baselines:
- `fcfs` (prefill-first, SGLang's default): while prompt work is pending, steps run prefill
  only, up to the prefill token budget; running streams pause meanwhile.
- `fcfs-chunked` (SGLang with chunked prefill mixed into decode): every step decodes all
  running requests and spends the prefill token budget on pending prompts alongside.

Admission keeps `headroom_pages_per_running` free pages per running request (default 1) so
that the admitted prompt does not force a preemption on the very next decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

from tfjax.request import Request, RequestStatus
from tfjax.sched.base import Plan, PrefillChunk, Resume, ResumeMode, SchedulerView


@dataclass(slots=True)
class PrefillFiller:
    """Packs prefill chunks into what is left of one step's token budget, pages and rows.

    Shared by the policies: each picks the order, this does the arithmetic.
    """

    view: SchedulerView
    free_pages: int
    tokens_left: int
    rows_left: int  # requests that may still become resident (decode batch cap)

    def try_add(self, request: Request, *, new_resident: bool, reserve_pages: int = 0) -> int:
        """Plan the next chunk of `request` if it fits; return its length (0 if none fits)."""
        if new_resident and self.rows_left <= 0:
            return 0
        remaining = request.num_uncomputed_prefill
        num_tokens = min(remaining, self.tokens_left)
        if num_tokens <= 0:
            return 0
        pages = self.view.pages_for(request, request.num_computed_tokens + num_tokens)
        if pages + reserve_pages > self.free_pages:
            # Fit a shorter chunk into the pages there are, whole pages only.
            spare = self.free_pages - reserve_pages - self.view.pages_for(request, 0)
            num_tokens = min(num_tokens, self._tokens_in_pages(request, spare))
            if num_tokens <= 0:
                return 0
            pages = self.view.pages_for(request, request.num_computed_tokens + num_tokens)
        self.free_pages -= pages
        self.tokens_left -= num_tokens
        if new_resident:
            self.rows_left -= 1
        return num_tokens

    def _tokens_in_pages(self, request: Request, num_pages: int) -> int:
        """How many more tokens fit if `request` gets `num_pages` more pages."""
        capacity = (len(request.page_ids) + max(0, num_pages)) * self.view.page_size
        return capacity - request.num_computed_tokens


def decode_pages_needed(view: SchedulerView, requests: list[Request]) -> int:
    """Pages that decoding one token of each of `requests` allocates this step."""
    return sum(view.pages_for(r, r.num_tokens) for r in requests)


class FcfsPolicy:
    def __init__(self, *, chunked: bool = False, headroom_pages_per_running: int = 1) -> None:
        self.chunked = chunked
        self.headroom_pages_per_running = headroom_pages_per_running
        self.name = "fcfs-chunked" if chunked else "fcfs"

    def plan(self, view: SchedulerView) -> Plan:
        resident = sorted(view.resident, key=lambda r: r.arrival_s)
        free = view.num_free_pages
        preempt: list[str] = []
        # Preempt newest-first until every remaining running request can decode.
        while resident:
            decoding = [r for r in resident if r.status is RequestStatus.RUNNING]
            if decode_pages_needed(view, decoding) <= free:
                break
            victim = resident.pop()
            preempt.append(victim.request_id)
            free += len(victim.page_ids)
        running = [r for r in resident if r.status is RequestStatus.RUNNING]
        prefilling = [r for r in resident if r.status is not RequestStatus.RUNNING]
        free -= decode_pages_needed(view, running)
        filler = PrefillFiller(
            view=view,
            free_pages=free,
            tokens_left=view.prefill_token_budget,
            rows_left=view.max_batch_size - len(resident),
        )
        chunks = [PrefillChunk(request_id=r.request_id, num_tokens=n) for r in prefilling
                  if (n := filler.try_add(r, new_resident=False))]
        resume: list[Resume] = []
        admit: list[str] = []
        if not preempt:
            headroom = self.headroom_pages_per_running * len(running)
            pending = sorted([*view.preempted, *view.waiting], key=lambda r: r.arrival_s)
            for request in pending:
                n = filler.try_add(request, new_resident=True, reserve_pages=headroom)
                if not n:
                    break  # strict FCFS: nobody overtakes the head of the queue
                chunks.append(PrefillChunk(request_id=request.request_id, num_tokens=n))
                if request.status is RequestStatus.PREEMPTED:
                    resume.append(Resume(request_id=request.request_id, mode=ResumeMode.RECOMPUTE))
                else:
                    admit.append(request.request_id)
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
