"""TokenFlow: buffer-aware preemptive scheduling (paper §3-4; docs/architecture/scheduler.md).

A decision runs every `schedule_interval_s` and on arrivals, and only under stress: a request
waits, or a resident or preempted request is buffer-critical (predicted buffer below
`critical_buffer_s`). Otherwise, and between decisions, nobody is displaced: every RUNNING
request decodes (work conservation), prefill chunks fill the token budget, free pages go to
waiting and preempted requests by `wanting_since`, and a missing page preempts the resident
with the largest buffer. A decision:

1. Capacity (Eq. 6): if the declared rates of the working set reach Gamma =
   `Costs.decode_capacity(n)`, the policy is `fcfs` until the next decision: every plan is
   the one an `FcfsPolicy` (kept alongside, with its own retract backoff) makes, so admission,
   batching, prefill and preemption are exactly FCFS's; only a preempted request whose host
   copy is complete comes back by LOAD when that beats re-prefilling it (`resume_mode`), which
   changes no batch (plain FCFS resumes cost the H200 burst 400 10% of its effective
   throughput). n is the batch the device would
   actually run: the live requests, capped by the batch cap and by the requests the device
   pages hold at the mean context of W and the queue; the costs are the step times measured
   at each batch size, so on a CPU, where a batch-32 step costs twice a batch-8 one, Gamma is
   the batch-32 rate and not the batch-8 one. The working set is W (resident + preempted)
   plus the waiting requests FCFS would admit now (queue order, while the batch cap and the
   free pages last). Judging W alone, as a literal reading of the paper has it, never sees
   overload: W is what admission let in under Gamma, so a burst of fast readers was admitted
   a Gamma's worth at a time and the device ran a third of the batch it could hold.
   Non-streaming requests (`Request.streaming` False) declare one batch row's rate (Gamma/n).
2. Working set: waiting requests join in queue order (`priority`, then arrival) while the
   rates stay under Gamma, W stays under Eq. 4's bound and the admitted prompts fit in one
   interval of prefill; an empty W always takes the head of the queue, whatever its rate.
   Admission is work-conserving: the requests that fit in the free pages and rows are the
   ones the capacity check counted, so they are all admitted (or the policy is FCFS).
3. Balancing, within each `priority` level (lower value first; a request is never displaced,
   and no swap is made, in favour of a request of lower priority): requests without a first
   token and non-streaming requests first (arrival order); then residents and
   critical non-residents by predicted buffer in seconds (a non-resident's minus its load or
   recompute time, negative while its reader stalls; a resident's minus `hysteresis_s`), then
   by rate; non-critical preempted requests last (they only fill free space). Residents that
   fail the safety rule `b_j >= mu * r_j * (t_evict + t_load + t_schedule)` are pinned, and so
   are non-streaming residents (no buffer: their client reads at the end). A
   greedy pass fills the device pages (context plus one interval of growth) and the batch
   cap; one pass of adjacent swaps keeps swaps that raise utility beyond their switch cost.
   Chosen newcomers are placed longest-wanting first, preempting left-out residents (worst
   first) only as far as they need room and only while the switch budget lasts. Preempted
   requests resume by LOAD when their host copy is complete and t_IO < t_recompute.

Parameters the paper leaves open (`TokenFlowConfig`), value and reason. Each was varied in
the simulator on the H200 400-request burst (docs/architecture/scheduler.md has the table).
- `schedule_interval_s` = 0.5: the paper's best Δt (§7.5); also t_schedule in the safety rule.
  1.0 s: +4% mean TTFT, -2% raw throughput.
- `buffer_conservativeness` (mu) = 2.0: the project's default; mu = 1: -3% effective
  throughput, and the margin also covers transfer times the engine measures with noise.
- `critical_buffer_s` (T_critical) = 1.0: two intervals, so a request found critical at one
  decision is back before its reader runs dry even if the next decision is an interval away.
  2.0 s swaps earlier than needed: -1% effective throughput, +9% stall.
- `hysteresis_s` = 2.0: displacement needs a buffer lower by this margin; 0: -5% effective
  throughput, +8% stall.
- `switch_budget` = 0.05: context switches for requests that already stream (their loads or
  re-prefills) may block the device at most 5% of the time; new prompts are exempt. A swap
  stalls every resident for one load (~10 ms for a 4k-token context on PCIe 5, about a decode
  step), and when demand is near capacity buffers hover low, so buffer balancing alone swaps
  every few seconds per request: without the budget 6.8k preemptions, 51 s of blocking loads,
  -13% raw throughput, +64% stall (an earlier prototype's warning). The paper (§8) "mitigates PCIe
  bandwidth contention by adaptively reducing preemption frequency". 0.02: -14% effective.
- `displace_only_critical` = True: a preempted request displaces a resident only once it is
  critical; earlier it only takes free pages (False: +43% stall, -5% effective).
- `prefill_first_backlog` = 1.0: once more than this many steps of new prompt tokens are
  queued (a burst), and until none is left, a step that prefills a new prompt does not decode
  (SGLang's prefill-first): each decode row slows the step and so every queued prompt (never
  prefill-first: p99 TTFT +5% here, +1.5% on the 4090 burst). Not while the queued prompts
  exceed the free pages: then memory holds them back and decoding frees it (Azure replay: p99
  TTFT 4.2 s instead of 6.5 s). With a short queue decode rows ride along only for a reader
  whose buffer would not last the prefill step: on a GPU they ride almost free, on a CPU a
  batch-8 step costs three batch-1 steps and every ride slows the prompts (issue 13).
- `v_i` = decode rate * the §7.1.3 weight the next token would get (L estimated by
  `max_tokens`); `phi(b)` = exp(-b / `phi_scale_s`), b the predicted buffer in seconds (raw
  tokens would make e^-b vanish above ~10 tokens), `phi_scale_s` = 1.0.
- `gamma` = 1.0, in units of the reader's tokens over an interval. The paper's `v*t - gamma*phi`
  is read as the gain of serving, `v*t + gamma*phi` (serving avoids the penalty): as printed,
  low buffers would lose priority.
- `buffer_bucket_s` = 0.25: buffers are compared in 0.25 s steps so the rate decides between
  near-equal ones (the paper sorts by buffer, value and rate but not how).
- `swap_min_gain` = 0.5 intervals of the dropped request's reading, on top of the switch cost.
- Eq. 5's lambda = 0 (W_scheduled = W_static): the safety rule already paces admission.
- `no_offload_overcommit` = 2.0: without a host tier W may hold twice what the device holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tfjax.request import Request, RequestStatus
from tfjax.sched.base import (
    Plan,
    ResumeMode,
    SchedulerView,
    buffer_s,
    declared_demand,
    is_decode_ready,
    queue_key,
)
from tfjax.sched.fcfs import FcfsPolicy
from tfjax.sched.plan_builder import assemble_plan

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED


def wanting_since(request: Request) -> float:
    """Since when the reader has wanted a token it does not have (may lie in the future).

    Arrival for a request without tokens or without a streaming reader, else the time its
    reader runs dry. Waiting for a first token and stalling cost the same in QoS
    (lambda = mu = 1), so both queue by this.
    """
    if not request.output_ids or not request.streaming:
        return request.arrival_s
    return request.reader.last_read_s + 1.0 / request.reader.rate


def resume_mode(view: SchedulerView, request: Request) -> ResumeMode | None:
    """LOAD when the host holds all of the request's KV and t_IO < t_recompute (paper §4.2.3).

    None (not now) while the rest of the host copy is in flight (the tail copied at
    preemption): recomputing would throw the copy away.
    """
    if view.host is None or not is_decode_ready(request):
        return ResumeMode.RECOMPUTE
    synced = view.host.num_synced_tokens(request.request_id)
    if synced != request.num_computed_tokens:
        in_flight = view.host.num_queued_tokens(request.request_id) == request.num_computed_tokens
        return None if in_flight else ResumeMode.RECOMPUTE
    costs = view.costs
    t_io = costs.io_backlog_s + costs.load_s(request.num_computed_tokens)
    t_recompute = costs.recompute_s(request.num_prefill_target)
    return ResumeMode.LOAD if t_io < t_recompute else ResumeMode.RECOMPUTE


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenFlowConfig:
    """Every knob of the policy; see the module docstring for values and reasons."""

    schedule_interval_s: float = 0.5
    buffer_conservativeness: float = 2.0
    critical_buffer_s: float = 1.0
    hysteresis_s: float = 2.0
    gamma: float = 1.0
    phi_scale_s: float = 1.0
    buffer_bucket_s: float = 0.25
    swap_min_gain: float = 0.5
    no_offload_overcommit: float = 2.0
    prefill_first_backlog: float = 1.0
    switch_budget: float = 0.05
    displace_only_critical: bool = True

    def __post_init__(self) -> None:
        if self.schedule_interval_s <= 0:
            raise ValueError("schedule_interval_s must be > 0")
        if self.buffer_conservativeness < 0 or self.hysteresis_s < 0:
            raise ValueError("buffer_conservativeness and hysteresis_s must be >= 0")
        if self.buffer_bucket_s <= 0 or self.phi_scale_s <= 0:
            raise ValueError("buffer_bucket_s and phi_scale_s must be > 0")


@dataclass(slots=True)
class _Candidate:
    request: Request
    resident: bool
    pinned: bool  # resident that the safety rule (or a running prefill) keeps on the device
    pages: int  # device pages it needs over the next interval if chosen
    held: int  # device pages it holds now
    overhead_s: float  # time before it produces a token if chosen
    pred_s: float  # predicted buffer in seconds once it produces again
    key: tuple
    chosen: bool = False


class TokenFlowPolicy:
    name = "tokenflow"
    resumes_by_load = True  # LOAD when t_IO < t_recompute (`resume_mode`)

    def __init__(self, config: TokenFlowConfig | None = None, **overrides: Any) -> None:
        self.config = replace(config or TokenFlowConfig(), **overrides)
        self._next_decision_s = -math.inf
        self._last_arrival_s = -math.inf
        self._gamma = math.inf
        self._row_rate = math.inf  # Gamma / n: what one batch row makes
        self._bound: int | None = None  # Eq. 4's W_static, computed at most once per decision
        self.fallback = False  # capacity check failed at the last decision
        self.num_decisions = 0  # full decisions (stressed, not in fallback)
        self.num_fallback_decisions = 0
        self._draining_backlog = False  # prefill-first until the prompt backlog is gone
        # Plans every step while demand exceeds capacity; resumes by LOAD where that is cheaper.
        self._fcfs = FcfsPolicy(resume_mode=resume_mode)
        # Device seconds that context switches (loads, re-prefills) may still block: refilled
        # at `switch_budget` per second up to four intervals' worth, which it starts with.
        cfg = self.config
        self._switch_credit_s = 4 * cfg.schedule_interval_s * cfg.switch_budget
        self._credit_at_s: float | None = None

    def plan(self, view: SchedulerView) -> Plan:
        arrived = bool(view.waiting) and view.waiting[-1].arrival_s > self._last_arrival_s
        if arrived:
            self._last_arrival_s = view.waiting[-1].arrival_s
        if arrived or view.now_s >= self._next_decision_s:
            self._next_decision_s = view.now_s + self.config.schedule_interval_s
            self._refill_switch_credit(view.now_s)
            batch = self._device_batch(view)
            self._gamma = view.costs.decode_capacity(batch)
            self._row_rate = self._gamma / batch
            self._bound = None
            # At capacity exactly (e.g. only non-streaming requests) there is no slack to share
            # out either; the tolerance absorbs the rounding of n * (Gamma / n).
            self.fallback = self._demand(view) >= self._gamma * (1.0 - 1e-9)
            self.num_fallback_decisions += self.fallback
            if not self.fallback and self._is_stressed(view):
                self.num_decisions += 1
                victims, chosen = self._balance(view)
                return self._assemble(view, victims, lambda: chosen)
        if self.fallback:
            return self._fcfs.plan(view)
        return self._assemble(view, [], lambda: self._fill_order(view))

    def _refill_switch_credit(self, now_s: float) -> None:
        cfg = self.config
        since = 0.0 if self._credit_at_s is None else now_s - self._credit_at_s
        self._credit_at_s = now_s
        cap = 4 * cfg.schedule_interval_s * cfg.switch_budget
        self._switch_credit_s = min(cap, self._switch_credit_s + since * cfg.switch_budget)

    def _assemble(
        self, view: SchedulerView, victims: list[Request], bring: Callable[[], Sequence[Request]]
    ) -> Plan:
        now = view.now_s

        def order(rs: list[Request]) -> list[Request]:
            # Lowest priority first; within it largest buffer first, prefills (no token yet)
            # last, newest first.
            return sorted(
                rs,
                key=lambda r: (r.priority, r.status is _RUNNING, buffer_s(r, now), r.arrival_s),
                reverse=True,
            )

        interval_tokens = self.config.schedule_interval_s / view.costs.decode_step_time(
            max(1, len(view.running))
        )
        growth = math.ceil(interval_tokens / view.page_size)
        return assemble_plan(
            view,
            victims=victims,
            bring=bring,
            pressure_order=order,
            choose_mode=lambda r: resume_mode(view, r),
            reserve_pages=lambda running: growth * len(running),
            prefill_first=self._prefill_first(view),
        )

    def _prefill_first(self, view: SchedulerView) -> bool:
        """Prefill-first from when more than `prefill_first_backlog` steps of new prompts are
        queued (a burst) until no new prompt is left, so the burst's last prompts wait too;
        but not while the queued prompts do not fit in the free pages: then memory, not
        compute, holds them back, and decoding is what frees it. With a shorter queue, also
        whenever every streaming reader has the buffer to wait out one prefill step: then
        the decode rows riding along would only slow the prompts (a CPU's batch-8 step costs
        three batch-1 steps), and nobody stalls for their absence."""
        limit = self.config.prefill_first_backlog * view.prefill_token_budget
        pending = 0
        for r in (*view.prefilling, *view.waiting):
            if not r.output_ids:
                pending += r.num_prefill_target - r.num_computed_tokens
        if pending > limit:
            self._draining_backlog = True
        elif pending == 0:
            self._draining_backlog = False
            return False
        if self._draining_backlog and -(-pending // view.page_size) <= view.num_free_pages:
            return True
        costs, now = view.costs, view.now_s
        wait_s = costs.decode_step_time(1) + costs.recompute_s(min(pending, limit))
        return all(r.reader.buffer_s(now) >= wait_s for r in view.running if r.streaming)

    def _demand(self, view: SchedulerView) -> float:
        """Declared rates of W plus those of the waiting requests FCFS would admit now."""
        members = [*view.resident, *view.preempted]
        rows = view.max_batch_size - len(view.resident)
        free = view.num_free_pages
        for r in sorted(view.waiting, key=queue_key):
            pages = -(-r.num_prompt_tokens // view.page_size) + 1
            if rows <= 0 or pages > free:
                break
            members.append(r)
            rows -= 1
            free -= pages
        return declared_demand(members, self._row_rate)

    def _device_batch(self, view: SchedulerView) -> int:
        """n of Eq. 6: the batch the device would run, the live requests capped by the batch
        cap and by how many fit in the device pages at the mean context of W and the queue."""
        members = [*view.resident, *view.preempted, *view.waiting]
        if not members:
            return 1
        mean_tokens = sum(len(r.prompt_ids) + len(r.output_ids) for r in members) / len(members)
        pages_each = math.ceil(mean_tokens / view.page_size) + 1
        fit = view.num_total_pages // pages_each
        return max(1, min(view.max_batch_size, fit, len(members)))

    def _working_set_bound(self, view: SchedulerView, members: list[Request]) -> int:
        """Eq. 4: W_static = M / beta, beta = mean final footprint (prompt + max_tokens)."""
        ps = view.page_size
        beta = sum(-(-(len(r.prompt_ids) + r.sampling.max_tokens) // ps) for r in members)
        beta = max(1.0, beta / max(1, len(members)))
        if view.host is None:
            memory = view.num_total_pages * self.config.no_offload_overcommit
        else:
            synced = view.host.num_synced_tokens
            held = sum(-(-synced(r.request_id) // ps) for r in (*view.resident, *view.preempted))
            memory = view.num_total_pages + view.host.num_free_pages + held
        return int(memory // beta)

    def _is_stressed(self, view: SchedulerView) -> bool:
        if view.waiting:
            return True
        now, critical = view.now_s, self.config.critical_buffer_s
        if any(r.streaming and r.reader.buffer_s(now) < critical for r in view.running):
            return True
        io = _IoModel(view)
        return any(
            buffer_s(r, now) - io.resume_s(r, r.num_tokens) < critical for r in view.preempted
        )

    def _fill_order(self, view: SchedulerView) -> list[Request]:
        """Who may take free pages without displacing anyone: by priority, then wanting."""
        return sorted(
            [*self._admissible(view, limit_tokens=None), *view.preempted],
            key=lambda r: (r.priority, wanting_since(r)),
        )

    def _admissible(
        self, view: SchedulerView, *, limit_tokens: int | None, chunk_cap: int = 0
    ) -> list[Request]:
        """Step 2: waiting requests (queue order) the working set can take now.

        `limit_tokens`: prompt tokens the engine can prefill before the next decision; a
        prompt counts at most `chunk_cap` of them (0: no cap), which is what the long-prefill
        threshold lets it run meanwhile, so short prompts behind a long one join it."""
        if not view.waiting:
            return []
        members = [*view.resident, *view.preempted]
        row_rate = self._row_rate
        demand = declared_demand(members, row_rate)
        if self._bound is None:  # once per decision: O(W) host lookups
            self._bound = self._working_set_bound(view, [*members, *view.waiting[:1]])
        bound = self._bound
        out: list[Request] = []
        tokens = 0
        for r in sorted(view.waiting, key=queue_key):
            rate = r.consumption_rate if r.streaming else row_rate
            # An empty working set always takes one request, however fast its reader or long
            # its output: the rules limit sharing the device, they must never leave it idle.
            over = demand + rate > self._gamma or len(members) + len(out) >= bound
            if over and (members or out):
                break
            prompt_tokens = r.num_prompt_tokens
            if chunk_cap:
                prompt_tokens = min(prompt_tokens, chunk_cap)
            if limit_tokens is not None and out and tokens + prompt_tokens > limit_tokens:
                break
            out.append(r)
            demand += rate
            tokens += prompt_tokens
        return out

    def _balance(self, view: SchedulerView) -> tuple[list[Request], list[Request]]:
        """Steps 2 and 3: returns (residents to preempt, non-residents to bring in, in order)."""
        cfg, costs, now, ps = self.config, view.costs, view.now_s, view.page_size
        interval = cfg.schedule_interval_s
        step_s = costs.decode_step_time(max(1, len(view.running)))
        growth_tokens = interval / step_s
        prefill_step_s = step_s + view.prefill_token_budget * costs.prefill_token_s
        prefill_steps = max(1.0, interval / prefill_step_s)
        admit_limit = int(view.prefill_token_budget * prefill_steps)
        chunk_cap = int(view.long_prefill_token_threshold * prefill_steps)
        io = _IoModel(view)
        inv_bucket = 1.0 / cfg.buffer_bucket_s
        mu, critical, hysteresis = (
            cfg.buffer_conservativeness,
            cfg.critical_buffer_s,
            cfg.hysteresis_s,
        )

        def growth_pages(r: Request, num_output: int) -> int:
            return math.ceil(min(growth_tokens, max(0, r.sampling.max_tokens - num_output)) / ps)

        cands: list[_Candidate] = []
        for r in view.prefilling:
            held = len(r.page_ids)
            pages = max(held, -(-r.num_prefill_target // ps)) + growth_pages(r, len(r.output_ids))
            key = (r.priority, 0, r.arrival_s)
            cands.append(_Candidate(r, True, True, pages, held, 0.0, 0.0, key))
        for r in view.running:
            num_output = len(r.output_ids)
            num_tokens = len(r.prompt_ids) + num_output
            reader, rate = r.reader, r.consumption_rate
            held = len(r.page_ids)
            pages = max(held, -(-num_tokens // ps)) + growth_pages(r, num_output)
            if not r.streaming:  # no reader buffer: it stays until it is done
                key = (r.priority, 0, r.arrival_s)
                cands.append(_Candidate(r, True, True, pages, held, 0.0, 0.0, key))
                continue
            buf = max(0.0, reader.last_read_s + 1.0 / reader.rate - now)  # reader.buffer_s(now)
            # Safety rule, b_j >= mu * r_j * (t_evict + t_load + t_schedule), b_j in tokens.
            window = io.evict_s(r) + io.back_s(r, num_tokens) + interval
            pinned = reader.buffer_tokens(now) < max(1.0, mu * rate * window)
            key = (r.priority, 1, math.floor((buf - hysteresis) * inv_bucket), -rate, r.arrival_s)
            cands.append(_Candidate(r, True, pinned, pages, held, 0.0, buf, key))
        admitted = self._admissible(view, limit_tokens=admit_limit, chunk_cap=chunk_cap)
        for r in [*view.preempted, *admitted]:
            num_output = len(r.output_ids)
            num_tokens = len(r.prompt_ids) + num_output
            overhead = io.resume_s(r, num_tokens)
            # Not clipped at 0: a reader stalling for s seconds has a buffer of -s, so a long
            # stall claims a place more strongly than a fresh one.
            pred = wanting_since(r) - now - overhead
            pages = -(-num_tokens // ps) + growth_pages(r, num_output)
            if not num_output or not r.streaming:
                key = (r.priority, 0, r.arrival_s)
            elif pred < critical or not cfg.displace_only_critical:
                group = math.floor(pred * inv_bucket)
                key = (r.priority, 1, group, -r.consumption_rate, r.arrival_s)
            else:
                key = (r.priority, 2, pred, -r.consumption_rate, r.arrival_s)
            cands.append(_Candidate(r, False, False, pages, 0, overhead, pred, key))

        # Greedy fill: pinned residents first, then by key, while pages and rows last.
        pages_left = view.num_total_pages
        rows_left = view.max_batch_size
        for c in cands:
            if c.pinned:
                c.chosen = True
                pages_left -= c.pages
                rows_left -= 1
        order = sorted((c for c in cands if not c.pinned), key=lambda c: c.key)
        for c in order:
            if rows_left > 0 and c.pages <= pages_left:
                c.chosen = True
                pages_left -= c.pages
                rows_left -= 1
        self._local_search(view, order, pages_left, 1.0 / step_s)

        # Preempt left-out residents (worst first) only as far as the chosen newcomers need
        # their pages or rows: a resident is never dropped just because the estimate is tight.
        free = view.num_free_pages - sum(c.pages - c.held for c in cands if c.resident)
        rows = view.max_batch_size - len(view.prefilling) - len(view.running)
        spare = [c for c in reversed(order) if c.resident and not c.chosen]
        victims: list[Request] = []
        bring: list[Request] = []
        newcomers = [c for c in order if c.chosen and not c.resident]
        for c in sorted(newcomers, key=lambda c: (c.request.priority, wanting_since(c.request))):
            rank = c.request.priority
            displaces = free < c.pages or rows < 1
            # Context switches spend the switch budget; new prompts (TTFT) do not.
            if displaces and c.request.output_ids and c.overhead_s > self._switch_credit_s:
                continue
            # Victims come worst first, so once the next one outranks the newcomer, all do.
            while (free < c.pages or rows < 1) and spare and spare[0].request.priority >= rank:
                v = spare.pop(0)
                victims.append(v.request)
                free += v.pages
                rows += 1
            if free < c.pages or rows < 1:
                break
            if displaces and c.request.output_ids:
                self._switch_credit_s -= c.overhead_s
            bring.append(c.request)
            free -= c.pages
            rows -= 1
        return victims, bring

    def _local_search(
        self, view: SchedulerView, order: list[_Candidate], pages_left: int, decode_rate: float
    ) -> None:
        """One pass of adjacent swaps across the fill boundary (paper §4.2.2).

        A swap trades a chosen candidate for its unchosen neighbour when the neighbour's gain
        `v * (t - overhead) + gamma * r * t * phi(b_pred)` beats it by more than the switch cost
        (its overhead at the decode rate) plus `swap_min_gain` of an interval of reading.
        """
        cfg = self.config
        interval = cfg.schedule_interval_s

        def gain(c: _Candidate) -> float:
            r = c.request
            tau = 0.1 * max(1, r.sampling.max_tokens)  # L estimated by max_tokens
            weight = min(1.0, max(0.0, 2.0 - r.reader.buffer_tokens(view.now_s) / tau))
            value = decode_rate * weight * max(0.0, interval - c.overhead_s)
            phi = math.exp(-max(0.0, c.pred_s) / cfg.phi_scale_s)
            return value + cfg.gamma * r.consumption_rate * interval * phi

        for a, b in zip(order, order[1:], strict=False):
            if a.chosen == b.chosen or a.request.priority != b.request.priority:
                continue
            out_c, in_c = (a, b) if a.chosen else (b, a)
            if in_c.pages - out_c.pages > pages_left:
                continue
            switch = 0.0 if in_c.resident else decode_rate * in_c.overhead_s
            margin = cfg.swap_min_gain * out_c.request.consumption_rate * interval
            if gain(in_c) - switch > gain(out_c) + margin:
                out_c.chosen, in_c.chosen = False, True
                pages_left += out_c.pages - in_c.pages


class _IoModel:
    """Transfer and recompute times of one view (paper §4.2.3), computed once per decision."""

    def __init__(self, view: SchedulerView) -> None:
        costs = view.costs
        self.host = view.host
        self.backlog_s = costs.io_backlog_s
        self.load_token_s = costs.kv_bytes_per_token / costs.h2d_bytes_per_s
        self.evict_token_s = costs.kv_bytes_per_token / costs.d2h_bytes_per_s
        self.prefill_token_s = costs.prefill_token_s

    def evict_s(self, r: Request) -> float:
        """Copying the unsynced tail of a resident to the host (0 without a host tier)."""
        if self.host is None:
            return 0.0
        unsynced = r.num_computed_tokens - self.host.num_synced_tokens(r.request_id)
        return self.backlog_s + max(0, unsynced) * self.evict_token_s

    def back_s(self, r: Request, num_tokens: int) -> float:
        """Bringing an evicted resident back: the cheaper of load and recompute."""
        recompute = (num_tokens - 1) * self.prefill_token_s
        if self.host is None:
            return recompute
        return min(recompute, self.backlog_s + r.num_computed_tokens * self.load_token_s)

    def resume_s(self, r: Request, num_tokens: int) -> float:
        """Seconds before a non-resident could produce again (LOAD if `resume_mode` would)."""
        target = num_tokens - 1 if r.output_ids else num_tokens
        recompute = target * self.prefill_token_s
        if (
            self.host is None
            or r.status is not _PREEMPTED
            or not r.output_ids
            or r.num_computed_tokens != target
            or self.host.num_synced_tokens(r.request_id) != target
        ):
            return recompute
        return min(recompute, self.backlog_s + target * self.load_token_s)
