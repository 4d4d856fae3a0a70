"""Streaming quality metrics from per-request token timelines (docs/definitions.md).

One function per definition, all computed from a `tfjax.buffers.Reader` (the reader model),
so the engine, the simulator and the benchmarks share one implementation:

- TTFT: arrival to first generated token.
- Stall: `Reader.stall_s`; stall ratio = total stall / total reading time (L_i / r_i).
- Token weight (effective throughput, paper §7.1.3): `w = 1` if the buffer B_j when token j
  is generated is `<= 0.1 L`, `1 - (B - 0.1 L)/(0.1 L)` if `<= 0.2 L`, else 0, with L the
  request's final output length.
- Effective / raw throughput: sum of weights / tokens over (last token time - first arrival).
- QoS (paper Eq. 2): `(1/T) * sum_i (sum_j w_ij - lam * TTFT_i - mu * Stall_i)`.

Requests that never produced a token are kept in the TTFT statistics (dropping them would
hide starvation) with a censored TTFT `end_s - arrival_s`, where `end_s` defaults to the last
token time of the run: a lower bound on their true TTFT. `summarize` reports how many there
were (`num_unstarted`). Such requests add no tokens, no stall and no reading time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tfjax.buffers import Reader


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenTimeline:
    """What happened to one request: when it arrived and its reader fed with its tokens."""

    arrival_s: float
    reader: Reader
    output_len: int | None = None  # L; None: the number of tokens in `reader`

    @classmethod
    def from_gen_times(
        cls, arrival_s: float, rate: float, gen_times_s: Sequence[float]
    ) -> TokenTimeline:
        """Build the reader from token generation times (rate must be > 0)."""
        reader = Reader(rate)
        for t in gen_times_s:
            reader.on_token(t)
        return cls(arrival_s=arrival_s, reader=reader)

    @property
    def num_tokens(self) -> int:
        return self.reader.num_tokens

    @property
    def length(self) -> int:
        return self.num_tokens if self.output_len is None else self.output_len

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token; None if the request never produced one."""
        first = self.reader.first_token_s
        return None if first is None else first - self.arrival_s

    @property
    def stall_s(self) -> float:
        return self.reader.stall_s

    @property
    def reading_s(self) -> float:
        """Time the reader needs for the whole output at its rate: L / r."""
        return self.num_tokens / self.reader.rate


def token_weights(buffers: Sequence[int], output_len: int) -> np.ndarray:
    """Effective-throughput weight of each token from its buffer B_j (tokens) and L."""
    b = np.asarray(buffers, dtype=np.float64)
    if output_len <= 0 or b.size == 0:
        return np.zeros(b.shape)
    tau = 0.1 * output_len
    return np.clip(1.0 - (b - tau) / tau, 0.0, 1.0)


def effective_tokens(timeline: TokenTimeline) -> float:
    return float(token_weights(timeline.reader.buffers, timeline.length).sum())


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def summarize(
    timelines: Sequence[TokenTimeline],
    *,
    lam: float = 1.0,
    mu: float = 1.0,
    end_s: float | None = None,
) -> dict[str, float]:
    """Aggregate metrics of one run. Times in seconds, throughputs in tokens/s.

    The span T is last token time - first arrival. With no span (no tokens, or all tokens at
    the first arrival instant) the throughputs and QoS are 0.
    """
    if not timelines:
        raise ValueError("no requests to summarize")
    first_arrival = min(t.arrival_s for t in timelines)
    token_ends = [t.reader.gen_times_s[-1] for t in timelines if t.num_tokens]
    last_token = max(token_ends) if token_ends else first_arrival
    censor_s = last_token if end_s is None else end_s
    span = last_token - first_arrival

    ttfts: list[float] = []
    num_unstarted = 0
    for t in timelines:
        ttft = t.ttft_s
        if ttft is None:
            num_unstarted += 1
            ttft = max(0.0, censor_s - t.arrival_s)
        ttfts.append(ttft)
    stalls = [t.stall_s for t in timelines]
    weights = [effective_tokens(t) for t in timelines]
    num_tokens = sum(t.num_tokens for t in timelines)
    reading = sum(t.reading_s for t in timelines)
    eff = sum(weights)
    qos_sum = eff - lam * sum(ttfts) - mu * sum(stalls)

    def per_s(x: float) -> float:
        return x / span if span > 0 else 0.0

    return {
        "num_requests": len(timelines),
        "num_unstarted": num_unstarted,
        "num_tokens": num_tokens,
        "span_s": span,
        "mean_ttft_s": float(np.mean(ttfts)),
        "p50_ttft_s": _percentile(ttfts, 50),
        "p99_ttft_s": _percentile(ttfts, 99),
        "max_ttft_s": float(np.max(ttfts)),
        "mean_stall_s": float(np.mean(stalls)),
        "p99_stall_s": _percentile(stalls, 99),
        "stall_ratio": sum(stalls) / reading if reading > 0 else 0.0,
        "effective_tokens": eff,
        "effective_throughput": per_s(eff),
        "raw_throughput": per_s(num_tokens),
        "qos": per_s(qos_sum),
    }
