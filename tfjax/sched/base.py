"""The seam between the engine and its scheduling policies.

Every engine step (and every simulator step) the owner builds a read-only `SchedulerView` and
asks the policy for a `Plan`; the KV manager then applies the plan's page operations and the
runner executes its prefill chunks and decode rows. Policies are pure Python and never import
JAX (a test enforces it), so the same objects run in the real engine and in `tfjax.sim`.

Contract of a plan (checked by `KVManager.execute`, which raises on violation):
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
  allocates: pages for loads, for prefill chunks and for decode tokens (`pages_for`).
A request appears at most once across preempt/resume/admit, and a preempted request is in
neither `prefill` nor `decode`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tfjax.request import Request


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

    @property
    def is_empty(self) -> bool:
        return not (self.preempt or self.resume or self.admit or self.prefill or self.decode)


@dataclass(frozen=True, kw_only=True, slots=True)
class Costs:
    """Measured (engine) or modelled (simulator) costs the policies plan with.

    All times in seconds, bandwidths in bytes/s. `decode_step_s` maps batch size -> step time
    (EWMA of measurements; missing sizes are interpolated by `decode_step_time`).
    """

    decode_step_s: dict[int, float] = field(default_factory=dict)
    prefill_token_s: float = 1e-3
    kv_bytes_per_token: int = 1
    d2h_bytes_per_s: float = 1e9
    h2d_bytes_per_s: float = 1e9
    io_backlog_s: float = 0.0  # queued, not yet finished transfers, in seconds of link time

    def decode_step_time(self, batch_size: int) -> float:
        """Step time at `batch_size`, linear between measured sizes, flat beyond them."""
        if not self.decode_step_s:
            return 0.02 * max(1, batch_size) ** 0.5
        sizes = sorted(self.decode_step_s)
        if batch_size <= sizes[0]:
            return self.decode_step_s[sizes[0]]
        for lo, hi in zip(sizes, sizes[1:], strict=False):
            if batch_size <= hi:
                frac = (batch_size - lo) / (hi - lo)
                return self.decode_step_s[lo] + frac * (
                    self.decode_step_s[hi] - self.decode_step_s[lo]
                )
        top = sizes[-1]
        return self.decode_step_s[top] * batch_size / top

    def decode_capacity(self, batch_size: int) -> float:
        """Tokens/s the device produces at `batch_size` (Gamma in the paper's Eq. 6)."""
        return batch_size / self.decode_step_time(max(1, batch_size))

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
    host: HostView | None = None
    loading: Sequence[Request] = ()  # LOADING: hold their pages, in no batch until loaded

    @property
    def resident(self) -> list[Request]:
        return [*self.prefilling, *self.running]

    def pages_for(self, request: Request, num_tokens: int) -> int:
        """Extra device pages `request` needs so that `num_tokens` tokens fit."""
        return max(0, -(-num_tokens // self.page_size) - len(request.page_ids))


class Policy(Protocol):
    name: str
    resumes_by_load: bool  # may plan ResumeMode.LOAD: only then is KV written to the host

    def plan(self, view: SchedulerView) -> Plan: ...
