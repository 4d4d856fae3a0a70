"""`KVManager.execute(plan)`: applies a plan's page operations to the requests, nothing else.

It owns the device `PageAllocator` and (when offload is on) the `HostTier`, moves requests
between statuses, and returns the `StepWork` the runner executes. It never runs the model.
Who frees what: preempting frees the victim's device pages at once (its unsynced KV is first
gathered into a fresh buffer, so the pages can be reused in this very step); finishing or
aborting frees both tiers through `release`.

Invariants, checked by `check` whenever the engine is idle and in tests: both allocators
balance, every device page in use belongs to exactly one resident request, and host copies
belong to preempted or resident requests only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from tfjax.kv.pages import PageAllocator
from tfjax.request import Request, RequestStatus
from tfjax.sched.base import Plan, ResumeMode

log = logging.getLogger(__name__)


class PlanError(RuntimeError):
    """A policy returned a plan that breaks the contract in `tfjax.sched.base`."""


@dataclass(frozen=True, slots=True)
class PrefillWork:
    request: Request
    num_tokens: int


@dataclass(frozen=True, slots=True)
class StepWork:
    prefill: tuple[PrefillWork, ...]
    decode: tuple[Request, ...]

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)


class KVManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.device = PageAllocator(num_pages)
        self.page_size = page_size
        self.num_preemptions = 0

    def pages_for(self, request: Request, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(request.page_ids))

    def execute(self, plan: Plan, requests: Mapping[str, Request]) -> StepWork:
        """Apply `plan`. A `PlanError` means a policy bug; the engine then fails the step."""
        named = [*plan.preempt, *(r.request_id for r in plan.resume), *plan.admit]
        if len(set(named)) != len(named):
            raise PlanError(f"a request is named twice in preempt/resume/admit: {plan}")
        for request_id in plan.preempt:
            self._preempt(
                self._get(requests, request_id, RequestStatus.PREFILLING, RequestStatus.RUNNING)
            )
        for resume in plan.resume:
            request = self._get(requests, resume.request_id, RequestStatus.PREEMPTED)
            if resume.mode is ResumeMode.LOAD:
                raise PlanError("resume by LOAD needs the host tier (offload is off)")
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREFILLING
        for request_id in plan.admit:
            self._get(requests, request_id, RequestStatus.WAITING).status = RequestStatus.PREFILLING
        prefill = []
        for chunk in plan.prefill:
            request = self._get(requests, chunk.request_id, RequestStatus.PREFILLING)
            if not 0 < chunk.num_tokens <= request.num_uncomputed_prefill:
                raise PlanError(f"bad chunk {chunk} for {request.num_uncomputed_prefill} tokens")
            self._grow(request, request.num_computed_tokens + chunk.num_tokens)
            prefill.append(PrefillWork(request, chunk.num_tokens))
        decode = []
        for request_id in plan.decode:
            request = self._get(requests, request_id, RequestStatus.RUNNING)
            self._grow(request, request.num_tokens)
            decode.append(request)
        return StepWork(prefill=tuple(prefill), decode=tuple(decode))

    def release(self, request: Request) -> None:
        """Free everything `request` holds (it finished or was aborted)."""
        self.device.free(request.page_ids)
        request.page_ids = []

    def check(self, requests: Mapping[str, Request]) -> None:
        self.device.check()
        owned = [p for r in requests.values() for p in r.page_ids]
        assert len(owned) == len(set(owned)), "a device page belongs to two requests"
        assert len(owned) == self.device.num_used, (
            f"requests own {len(owned)} pages, allocator says {self.device.num_used} in use"
        )

    def _preempt(self, request: Request) -> None:
        self.release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1

    def _grow(self, request: Request, num_tokens: int) -> None:
        need = self.pages_for(request, num_tokens)
        if not self.device.can_allocate(need):
            raise PlanError(f"{request.request_id} needs {need} pages, {self.device.num_free} free")
        request.page_ids.extend(self.device.allocate(need))

    @staticmethod
    def _get(requests: Mapping[str, Request], request_id: str, *allowed: RequestStatus) -> Request:
        request = requests.get(request_id)
        if request is None or request.status not in allowed:
            state = request.status.value if request else "unknown"
            raise PlanError(f"{request_id} is {state}, expected {[s.value for s in allowed]}")
        return request
