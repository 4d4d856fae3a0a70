"""Derive the paper's regime for `tfjax bench compare --calibrate` from measured capacity.

The workload should sit where TokenFlow's scheduling matters: the burst holds more requests than
the device KV pool keeps resident at once, while the engine's decode capacity still exceeds the
burst's summed consumption rates, so serving everyone just in time is possible and FCFS instead
makes the late arrivals queue. This module measures decode capacity Gamma(b) (tokens/s with b
concurrent streams, in the window when all b are decoding) and, for a resident set of R
requests:

    burst B      = ceil(oversubscription * R)                  (default 2.5 R)
    mean rate    = headroom * Gamma(R) / B                     (default headroom 0.6; the rate
                   mix keeps its shape and is scaled to this mean)
    output len   = what the slowest reader reads in the time budget per policy
    KV pages     = R * ceil((input + output) / page_size) + 1  (page 0 is padding), rounded up
                   to a multiple of 16 so that repeated calibrations reuse compiled shapes
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

from tfjax.bench.client import ClientConfig, RequestRecord, run_requests
from tfjax.bench.workload import ClientRequest
from tfjax.sim.workload import parse_rate_mix


def steady_decode_rate(records: Sequence[RequestRecord]) -> float:
    """Tokens/s of concurrent streams while all of them were decoding.

    The window runs from the last first token to the first last token, so prefill and the tail
    with fewer streams are left out; with no such window, all tokens over the whole span.
    """
    ok = [r for r in records if r.ok]
    if not ok:
        raise RuntimeError(
            "calibration requests failed: "
            + "; ".join(sorted({r.error or "no tokens" for r in records}))
        )
    lo = max(r.chunk_times_s[0] for r in ok)
    hi = min(r.chunk_times_s[-1] for r in ok)
    tokens = sum(
        n for r in ok for t, n in zip(r.chunk_times_s, r.chunk_tokens, strict=True) if lo < t <= hi
    )
    if hi - lo > 0.5 and tokens:
        return tokens / (hi - lo)
    span = max(r.chunk_times_s[-1] for r in ok) - min(r.chunk_times_s[0] for r in ok)
    return sum(r.output_tokens for r in ok) / span


def measure_capacity(
    base_url: str, model: str, batch_sizes: Sequence[int], *, prompt_len: int, output_len: int
) -> dict[int, float]:
    """Gamma(b): decode tokens/s with b concurrent streams, for each b."""
    cfg = ClientConfig(base_url=base_url, model=model, request_timeout_s=300)
    capacity = {}
    for b in batch_sizes:
        reqs = [
            ClientRequest(
                index=i, arrival_s=0.0, prompt_len=prompt_len, output_len=output_len, rate=1000.0
            )
            for i in range(b)
        ]
        records, _ = asyncio.run(run_requests(cfg, reqs, progress=False))
        capacity[b] = steady_decode_rate(records)
        print(f"  Gamma({b}) = {capacity[b]:.1f} tok/s ({capacity[b] / b:.1f} per stream)")
    return capacity


@dataclass(frozen=True, kw_only=True)
class Workload:
    burst_size: int
    input_len: int
    output_len: int
    rate_mix: str
    kv_pages: int
    reasoning: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RegimeTargets:
    """The knobs of the derivation (see the module docstring)."""

    resident: int
    oversubscription: float
    headroom: float
    rate_mix_shape: str
    input_len: int
    max_output_len: int
    page_size: int
    run_budget_s: float


def derive_workload(capacity: dict[int, float], t: RegimeTargets) -> Workload:
    """The paper's regime on this machine, from measured capacity (see the module docstring)."""
    if t.resident not in capacity:
        raise ValueError(f"--resident {t.resident} was not measured: {sorted(capacity)}")
    gamma = capacity[t.resident]
    burst = math.ceil(t.oversubscription * t.resident)
    mean_rate = t.headroom * gamma / burst
    mix = parse_rate_mix(t.rate_mix_shape)
    shape_mean = sum(r * s for r, s in mix) / sum(s for _, s in mix)
    scaled = [(round(r * mean_rate / shape_mean, 1), s) for r, s in mix]
    rate_mix = ",".join(f"{r:g}:{s:g}" for r, s in scaled)
    slowest = min(r for r, _ in scaled)
    # The slowest reader needs output/slowest seconds; leave 40% of the budget for TTFT waits.
    output_len = max(16, min(t.max_output_len, int(0.6 * t.run_budget_s * slowest)))
    pages_each = math.ceil((t.input_len + output_len) / t.page_size)
    kv_pages = 16 * math.ceil((t.resident * pages_each + 1) / 16)
    reasoning = (
        f"decode capacity with R = {t.resident} resident streams: Gamma(R) = {gamma:.1f} tok/s",
        f"burst B = ceil({t.oversubscription:g} * R) = {burst} requests > R: the pool cannot "
        "keep the whole burst resident",
        f"mean consumption rate = {t.headroom:g} * Gamma(R) / B = {mean_rate:.2f} tok/s, so the "
        f"burst reads {burst * mean_rate:.1f} tok/s < Gamma(R): just-in-time service is possible",
        f"rate mix {t.rate_mix_shape} scaled to that mean: {rate_mix}",
        f"output length {output_len} (cap {t.max_output_len}): the slowest reader "
        f"({slowest:g} tok/s) reads it in {output_len / slowest:.0f} s of the "
        f"{t.run_budget_s:.0f} s budget per policy",
        f"KV pages = R * ceil(({t.input_len} + {output_len}) / {t.page_size}) + 1 = "
        f"{t.resident * pages_each + 1}, rounded up to {kv_pages}",
        f"FCFS decodes the first ~R at {gamma / t.resident:.1f} tok/s each; later arrivals wait "
        f"about {output_len / (gamma / t.resident):.0f} s per wave of R",
    )
    return Workload(
        burst_size=burst,
        input_len=t.input_len,
        output_len=output_len,
        rate_mix=rate_mix,
        kv_pages=kv_pages,
        reasoning=reasoning,
    )
