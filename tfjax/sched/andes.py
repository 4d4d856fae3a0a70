"""Andes: QoE-gain per KV page greedy knapsack (arXiv 2404.16283; our notes §8).

Andes, as the TokenFlow paper re-implemented it: recompute preemption only (no host tier
even when one exists), and a solver that runs only when the device KV use is above
`trigger_kv_usage`. Below it every resident request is served and waiting requests are
admitted in arrival order into free pages, like `fcfs-chunked`; a missing page preempts the
newest resident, and SGLang's retract backoff (`packer.RetractBackoff`) applies, since the
paper's Andes ran inside SGLang.

The solver (every `solver_every_steps` steps while triggered) scores each resident, preempted
and waiting request by its expected QoE gain over a horizon, `(QoE_serve - QoE_wait) *
(1 + running_bonus * is_running)`, divided by the pages its context needs, and greedily packs
the device pages and the batch cap in that order. Residents left out are preempted (by
recompute) while the preemption budget lasts; chosen non-residents are admitted or resumed.

QoE over the horizon follows the official code (`qoe_tracker.py`, `knapsack_solver.py`): with
`expected` the tokens an ideal stream would have delivered by the horizon end (rate *
(t_end - arrival - expected_ttft_s)) and `actual` what this request will have delivered,
`QoE = 1 - ((expected - min(actual, expected)) / expected)^2`. Tokens ahead of the reader add
nothing, so requests with large buffers gain nothing and are the first to go.

Parameters (`AndesConfig`):
- `trigger_kv_usage` = 0.9: the paper's selective-triggering threshold.
- `horizon_s` = 2.5: the official code's delta_t (50 iterations) * token_latency (0.05 s).
- `expected_ttft_s` = 1.0: the TTFT an ideal stream would have; the user study's 1.3 s engagement
  limit, rounded down.
- `running_bonus` = 0.5 and `solver_every_steps` = 10: the official code's values.
- `preemption_cap` = 1.0: average solver preemptions per request seen (the paper's P).

`priority` (lower value first, ties by arrival; `base.queue_key`) orders admission and the
pressure victims (lowest priority, newest first) as in `fcfs`, and ranks the solver's
candidates before their QoE density, so the solver never trades a request for one of lower
priority. Non-streaming requests (read at the end) rank first within their priority, in
arrival order, and are never solver victims: a buffer they do not have cannot justify
pausing them.

Not implemented: the paper's overhead-aware refiner (admit only if the gain beats the QoE the
switch costs everyone else); the official code has none either. Without it, on workloads with
long prompts the solver trades long residents for short newcomers and pays with re-prefills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from tfjax.request import Request, RequestStatus
from tfjax.sched.base import SchedulerView
from tfjax.sched.packer import Decision, PackingPolicy

_RUNNING = RequestStatus.RUNNING


@dataclass(frozen=True, kw_only=True, slots=True)
class AndesConfig:
    trigger_kv_usage: float = 0.9
    horizon_s: float = 2.5
    expected_ttft_s: float = 1.0
    running_bonus: float = 0.5
    solver_every_steps: int = 10
    preemption_cap: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.trigger_kv_usage <= 1.0:
            raise ValueError("trigger_kv_usage must be in [0, 1]")
        if self.horizon_s <= 0 or self.solver_every_steps < 1 or self.preemption_cap < 0:
            raise ValueError("horizon_s > 0, solver_every_steps >= 1, preemption_cap >= 0")


def qoe(expected: float, actual: float) -> float:
    """Andes' per-request QoE from expected and delivered token counts, in [0, 1]."""
    if expected <= 0:
        return 1.0
    short = (expected - min(actual, expected)) / expected
    return 1.0 - short * short


class AndesPolicy(PackingPolicy):
    name = "andes"
    resumes_by_load = False  # always recomputes

    def __init__(self, config: AndesConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = replace(config or AndesConfig(), **overrides)
        self._num_steps = 0
        self._seen: set[str] = set()
        self.num_solver_runs = 0
        self.num_solver_preemptions = 0

    def decide(self, view: SchedulerView) -> Decision:
        """The solver's pick (every `solver_every_steps` steps above the trigger), else the
        queue order, as `fcfs-chunked`."""
        self._num_steps += 1
        for r in view.waiting:
            self._seen.add(r.request_id)
        used = 1.0 - view.num_free_pages / max(1, view.num_total_pages)
        triggered = used > self.config.trigger_kv_usage
        if triggered and self._num_steps % self.config.solver_every_steps == 0:
            self.num_solver_runs += 1
            victims, bring = self._solve(view)
            return Decision(pause=tuple(victims), first=tuple(bring), prefill_first=False)
        return Decision(prefill_first=False)

    def _gain(self, view: SchedulerView, r: Request, decode_rate: float) -> float:
        cfg = self.config
        t_end = view.now_s + cfg.horizon_s
        expected = r.consumption_rate * (t_end - r.arrival_s - cfg.expected_ttft_s)
        expected = min(float(r.sampling.max_tokens), expected)
        resident = r.status is _RUNNING or r.status is RequestStatus.PREFILLING
        overhead = 0.0 if resident else view.costs.recompute_s(r.num_prefill_target)
        if r.status is RequestStatus.PREFILLING:
            overhead = view.costs.recompute_s(r.num_uncomputed_prefill)
        served = r.num_output_tokens + decode_rate * max(0.0, cfg.horizon_s - overhead)
        gain = qoe(expected, served) - qoe(expected, r.num_output_tokens)
        return gain * (1.0 + cfg.running_bonus * (r.status is _RUNNING))

    def _solve(self, view: SchedulerView) -> tuple[list[Request], list[Request]]:
        """Greedy knapsack by QoE gain per page; returns (victims, requests to bring in)."""
        ps = view.page_size
        decode_rate = 1.0 / view.costs.decode_step_time(max(1, len(view.running)))
        cands = [*view.resident, *view.preempted, *view.waiting]

        def density(r: Request) -> float:
            pages = max(1, math.ceil((r.num_tokens + 1) / ps))
            return self._gain(view, r, decode_rate) / pages

        # Non-streaming requests have no reader to trade off: within their priority they go
        # first, in arrival order (their QoE density is not defined without a reading rate).
        def rank(r: Request) -> tuple:
            return (r.priority, r.streaming, -density(r) if r.streaming else 0.0, r.arrival_s)

        ranked = sorted(cands, key=rank)
        pages_left = view.num_total_pages
        rows_left = view.max_batch_size
        chosen: set[str] = set()
        for r in ranked:
            pages = math.ceil((r.num_tokens + 1) / ps)
            if rows_left > 0 and pages <= pages_left:
                chosen.add(r.request_id)
                pages_left -= pages
                rows_left -= 1
        budget = int(self.config.preemption_cap * len(self._seen)) - self.num_solver_preemptions
        victims: list[Request] = []
        for r in reversed(ranked):  # lowest density first
            if len(victims) >= budget:
                break
            if r.status is _RUNNING and r.streaming and r.request_id not in chosen:
                victims.append(r)
        self.num_solver_preemptions += len(victims)
        bring = [
            r
            for r in ranked
            if r.request_id in chosen
            and r.status is not _RUNNING
            and r.status is not RequestStatus.PREFILLING
        ]
        return victims, bring
