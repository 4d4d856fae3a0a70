"""TokenFlow: buffer-aware preemptive scheduling (paper §3-4).

This module owns TokenFlow's decisions, nothing that spends a budget: every step it returns a
`Decision` (who pauses, who comes first, how each preempted request resumes, prefill-first or
not, write-through or not) and `tfjax.sched.packer` packs it, as it packs FCFS's. So TokenFlow
can reorder and pause, but never plan fewer rows or prompt tokens than FCFS in the same state.

- Between decisions, and when nothing is under stress, the decision is the fill order: waiting
  and preempted requests by priority, then by how long their reader has wanted a token
  (`wanting_since`); residents leave under page pressure largest buffer first.
- A decision runs every `schedule_interval_s` and on arrivals. Overloaded (the declared rates
  reach Gamma, the decode rate at the batch and context the device would run, from measured
  step times) it is FCFS until the next decision, with resumes by LOAD where cheaper and no
  write-through. Stressed (a request waits or a reader nears stalling) it balances buffers:
  the safety rule pins residents that could not be swapped back in time, a greedy fill by
  buffer and a pass of adjacent swaps pick who runs, and chosen newcomers displace left-out
  residents within the switch budget, never for a lower priority.

The derivation of each rule from the paper, and every parameter's value with its reason, are in
docs/architecture/scheduler.md ("TokenFlow's decision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tfjax.kv.pages import pages_needed
from tfjax.request import Request, RequestStatus
from tfjax.sched.base import (
    ResumeMode,
    SchedulerView,
    buffer_s,
    declared_demand,
    is_decode_ready,
    queue_key,
)
from tfjax.sched.packer import Decision, Packer, PackingPolicy

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
    """Every knob of the policy; docs/architecture/scheduler.md gives values and reasons."""

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
    """A request competing for the device at a balancing decision."""

    request: Request
    resident: bool
    pages: int  # device pages it needs over the next interval if chosen
    key: tuple  # balancing order (smaller first)
    pinned: bool = False  # resident the safety rule (or its state) keeps on the device
    held: int = 0  # device pages it holds now
    overhead_s: float = 0.0  # time before it produces a token if chosen
    pred_s: float = 0.0  # predicted buffer in seconds once it produces again
    chosen: bool = False


class TokenFlowPolicy(PackingPolicy):
    name = "tokenflow"
    resumes_by_load = True  # LOAD when t_IO < t_recompute (`resume_mode`)

    def __init__(self, config: TokenFlowConfig | None = None, **overrides: Any) -> None:
        super().__init__(Packer(swaps=True))
        self.config = replace(config or TokenFlowConfig(), **overrides)
        self._next_decision_s = -math.inf
        self._last_arrival_s = -math.inf
        self._gamma = math.inf
        self._row_rate = math.inf  # Gamma / n: what one batch row makes
        self._bound: int | None = None  # Eq. 4's W_static, computed at most once per decision
        self.fallback = False  # capacity check failed at the last decision
        self.num_decisions = 0  # full decisions (stressed, not in fallback)
        self.num_fallback_decisions = 0
        self._mode = "fill"  # what the last step's decision was: fallback, balance or fill
        self._last_demand = 0.0  # Eq. 6's declared demand at the last capacity check
        self._draining_backlog = False  # prefill-first until the prompt backlog is gone
        # Device seconds that context switches (loads, re-prefills) may still block: refilled
        # at `switch_budget` per second up to four intervals' worth, which it starts with.
        cfg = self.config
        self._switch_credit_s = 4 * cfg.schedule_interval_s * cfg.switch_budget
        self._credit_at_s: float | None = None

    def decide(self, view: SchedulerView) -> Decision:
        modes = {r.request_id: resume_mode(view, r) for r in view.preempted}
        if self._decision_due(view):
            self._next_decision_s = view.now_s + self.config.schedule_interval_s
            self._refill_switch_credit(view.now_s)
            self.fallback = self._overloaded(view)
            self.num_fallback_decisions += self.fallback
            if not self.fallback and self._is_stressed(view):
                self.num_decisions += 1
                self._mode = "balance"
                pause, bring = self._balance(view)
                return self._decision(view, modes, pause=tuple(pause), first=tuple(bring))
        if self.fallback:  # FCFS; a resume by LOAD changes no batch, write-through would cost
            self._mode = "fallback"
            # Under a long-prefill threshold, decode rides along the capped chunks, as the flag
            # promises every policy but fcfs (fcfs-chunked's rule): prefill-first stalled 31
            # short streams 18-20 s beside one 3,000-token prompt's 32-token chunks.
            return Decision(resume=modes, prefill_first=not view.long_prefill_token_threshold)
        self._mode = "fill"
        return self._decision(view, modes, first=self._fill_order(view))

    def trace_fields(self) -> dict[str, object]:
        """What the step trace (`tfjax.step_trace`) records of this step's decision: its
        mode, and Eq. 6's capacity Gamma and declared demand at the last check (tokens/s), so
        that a live and a simulated trace show where their decisions part."""
        return {
            "mode": self._mode,
            "capacity_tok_s": round(self._gamma, 2) if math.isfinite(self._gamma) else None,
            "demand_tok_s": round(self._last_demand, 2),
        }

    def _decision(
        self,
        view: SchedulerView,
        modes: dict[str, ResumeMode | None],
        *,
        pause: tuple[Request, ...] = (),
        first: tuple[Request, ...] = (),
    ) -> Decision:
        return Decision(
            pause=pause,
            first=first,
            leave_order=self._leave_order(view),
            resume=modes,
            prefill_first=self._prefill_first(view),
            write_through=True,
        )

    @staticmethod
    def _leave_order(view: SchedulerView) -> tuple[Request, ...] | None:
        """Who leaves first when decoding runs out of pages: with a host tier, the lowest
        priority, then the largest buffer (running before prefilling, newest first): its
        reader waits longest and a LOAD brings it back cheaply. Without one every victim comes
        back by re-prefilling its whole context, so FCFS's order (None: the newest, whose
        context is the shortest) is the cheaper one."""
        if view.host is None:
            return None
        now = view.now_s
        return tuple(
            sorted(
                view.resident,
                key=lambda r: (r.priority, r.status is _RUNNING, buffer_s(r, now), r.arrival_s),
                reverse=True,
            )
        )

    def _decision_due(self, view: SchedulerView) -> bool:
        arrived = bool(view.waiting) and view.waiting[-1].arrival_s > self._last_arrival_s
        if arrived:
            self._last_arrival_s = view.waiting[-1].arrival_s
        return arrived or view.now_s >= self._next_decision_s

    def _refill_switch_credit(self, now_s: float) -> None:
        cfg = self.config
        since = 0.0 if self._credit_at_s is None else now_s - self._credit_at_s
        self._credit_at_s = now_s
        cap = 4 * cfg.schedule_interval_s * cfg.switch_budget
        self._switch_credit_s = min(cap, self._switch_credit_s + since * cfg.switch_budget)

    def _overloaded(self, view: SchedulerView) -> bool:
        """Eq. 6: do the declared rates reach Gamma, the tokens/s of the batch the device
        would run, at the context its rows will have? (Also sets Gamma for this decision.)
        At capacity exactly (e.g. only non-streaming requests) there is no slack to share out
        either; the tolerance absorbs the rounding of n * (Gamma / n)."""
        batch, context = self._device_batch(view)
        self._gamma = view.costs.decode_capacity(batch, context)
        self._row_rate = self._gamma / batch
        self._bound = None
        self._last_demand = self._demand(view)
        return self._last_demand >= self._gamma * (1.0 - 1e-9)

    def _prefill_first(self, view: SchedulerView) -> bool:
        """Prefill-first from when more than `prefill_first_backlog` steps of new prompts are
        queued (a burst) until no new prompt is left, so the burst's last prompts wait too;
        but not while the queued prompts do not fit in the free pages: then memory, not
        compute, holds them back, and decoding is what frees it. With a shorter queue, also
        whenever every streaming reader has the buffer to wait out one prefill step: then
        the decode rows riding along would only slow the prompts (a CPU's batch-8 step costs
        three batch-1 steps), and nobody stalls for their absence.

        Under a long-prefill threshold a prompt counts at most one capped chunk, as in
        admission: a prefill-first step runs no more of it, so counting the rest held every
        decode row back for the whole of one long prompt's chunks (31 short streams stalled
        19-20 s beside a 3,000-token prompt at a 32-token cap)."""
        limit = self.config.prefill_first_backlog * view.prefill_token_budget
        cap = view.long_prefill_token_threshold
        pending = 0
        for r in (*view.prefilling, *view.waiting):
            if not r.output_ids:
                left = r.num_prefill_target - r.num_computed_tokens
                pending += min(left, cap) if cap else left
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

    def _device_batch(self, view: SchedulerView) -> tuple[int, float]:
        """n of Eq. 6 and the context its rows will have: the live requests, capped by the
        batch cap and by how many fit in the device pages at the mean context of W and the
        queue; each row's context is its prompt plus the middle of the output it has left to
        decode (today's context alone would price a burst at its first, cheapest steps)."""
        members = [*view.resident, *view.preempted, *view.waiting]
        if not members:
            return 1, 0.0
        now_tokens = sum(len(r.prompt_ids) + len(r.output_ids) for r in members) / len(members)
        ahead = sum(
            len(r.prompt_ids) + (len(r.output_ids) + r.sampling.max_tokens) / 2 for r in members
        ) / len(members)
        fit = view.num_total_pages // (pages_needed(math.ceil(now_tokens), view.page_size) + 1)
        return max(1, min(view.max_batch_size, fit, len(members))), ahead

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

    def _fill_order(self, view: SchedulerView) -> tuple[Request, ...]:
        """Who takes free pages without displacing anyone: every waiting and preempted
        request, by priority, then by how long its reader has wanted a token."""
        return tuple(
            sorted([*view.waiting, *view.preempted], key=lambda r: (r.priority, wanting_since(r)))
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
        """Steps 2 and 3: returns (residents to pause, non-residents to bring in, in order)."""
        step_s = view.costs.decode_step_time(max(1, len(view.running)))
        cands = self._candidates(view, step_s)
        # Greedy fill: pinned residents first, then by key, while pages and rows last.
        pages_left = view.num_total_pages
        rows_left = view.max_batch_size
        order = sorted((c for c in cands if not c.pinned), key=lambda c: c.key)
        for c in [*(c for c in cands if c.pinned), *order]:
            if c.pinned or (rows_left > 0 and c.pages <= pages_left):
                c.chosen = True
                pages_left -= c.pages
                rows_left -= 1
        self._local_search(view, order, pages_left, 1.0 / step_s)
        return self._place_newcomers(view, cands, order)

    def _candidates(self, view: SchedulerView, step_s: float) -> list[_Candidate]:
        """Everyone competing for the device: residents, preempted requests, and the waiting
        ones the working set can take (`_admissible`), each with its pages and balancing key."""
        interval = self.config.schedule_interval_s
        growth_tokens = interval / step_s
        prefill_step_s = step_s + view.prefill_token_budget * view.costs.prefill_token_s
        prefill_steps = max(1.0, interval / prefill_step_s)
        io = _IoModel(view)
        cands = [self._resident(view, r, io, growth_tokens) for r in view.resident]
        admitted = self._admissible(
            view,
            limit_tokens=int(view.prefill_token_budget * prefill_steps),
            chunk_cap=int(view.long_prefill_token_threshold * prefill_steps),
        )
        cands += [self._outsider(view, r, io, growth_tokens) for r in [*view.preempted, *admitted]]
        return cands

    def _resident(
        self, view: SchedulerView, r: Request, io: _IoModel, growth_tokens: float
    ) -> _Candidate:
        """A resident: pinned while it prefills, has no reader buffer (non-streaming), or fails
        the safety rule b_j >= mu * r_j * (t_evict + t_load + t_schedule), b_j in tokens."""
        cfg, now, ps = self.config, view.now_s, view.page_size
        num_tokens = r.num_prefill_target if r.status is not _RUNNING else r.num_tokens
        held = len(r.page_ids)
        pages = max(held, pages_needed(num_tokens, ps)) + _growth_pages(r, growth_tokens, ps)
        if r.status is not _RUNNING or not r.streaming:
            key = (r.priority, 0, r.arrival_s)
            return _Candidate(r, resident=True, pages=pages, key=key, pinned=True, held=held)
        buf = r.reader.buffer_s(now)
        window = io.evict_s(r) + io.back_s(r, num_tokens) + cfg.schedule_interval_s
        rate = r.consumption_rate
        pinned = r.reader.buffer_tokens(now) < max(1.0, cfg.buffer_conservativeness * rate * window)
        group = math.floor((buf - cfg.hysteresis_s) / cfg.buffer_bucket_s)
        key = (r.priority, 1, group, -rate, r.arrival_s)
        return _Candidate(
            r, resident=True, pages=pages, key=key, pinned=pinned, held=held, pred_s=buf
        )

    def _outsider(
        self, view: SchedulerView, r: Request, io: _IoModel, growth_tokens: float
    ) -> _Candidate:
        """A preempted or admissible waiting request: requests without a first token and
        non-streaming ones first; critical ones by predicted buffer; the rest only fill."""
        cfg = self.config
        num_output = len(r.output_ids)
        num_tokens = len(r.prompt_ids) + num_output
        overhead = io.resume_s(r, num_tokens)
        # Not clipped at 0: a reader stalling for s seconds has a buffer of -s, so a long
        # stall claims a place more strongly than a fresh one.
        pred = wanting_since(r) - view.now_s - overhead
        pages = pages_needed(num_tokens, view.page_size)
        pages += _growth_pages(r, growth_tokens, view.page_size)
        if not num_output or not r.streaming:
            key: tuple = (r.priority, 0, r.arrival_s)
        elif pred < cfg.critical_buffer_s or not cfg.displace_only_critical:
            group = math.floor(pred / cfg.buffer_bucket_s)
            key = (r.priority, 1, group, -r.consumption_rate, r.arrival_s)
        else:
            key = (r.priority, 2, pred, -r.consumption_rate, r.arrival_s)
        return _Candidate(r, resident=False, pages=pages, key=key, overhead_s=overhead, pred_s=pred)

    def _place_newcomers(
        self, view: SchedulerView, cands: list[_Candidate], order: list[_Candidate]
    ) -> tuple[list[Request], list[Request]]:
        """Chosen newcomers, longest-wanting first, preempting left-out residents (worst first)
        only as far as they need room and only while the switch budget lasts: a resident is
        never dropped just because the estimate is tight, nor for a lower priority."""
        free = view.num_free_pages - sum(c.pages - c.held for c in cands if c.resident)
        rows = view.max_batch_size - len(view.resident)
        spare = [c for c in reversed(order) if c.resident and not c.chosen]
        victims: list[Request] = []
        bring: list[Request] = []
        newcomers = [c for c in order if c.chosen and not c.resident]
        for c in sorted(newcomers, key=lambda c: (c.request.priority, wanting_since(c.request))):
            displaces = free < c.pages or rows < 1
            # Context switches spend the switch budget; new prompts (TTFT) do not.
            if displaces and c.request.output_ids and c.overhead_s > self._switch_credit_s:
                continue
            # Victims come worst first, so once the next one outranks the newcomer, all do.
            rank = c.request.priority
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


def _growth_pages(r: Request, growth_tokens: float, page_size: int) -> int:
    """Pages `r` grows by over one interval of decoding (never past `max_tokens`)."""
    left = max(0, r.sampling.max_tokens - len(r.output_ids))
    return math.ceil(min(growth_tokens, left) / page_size)
