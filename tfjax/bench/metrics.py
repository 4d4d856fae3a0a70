"""A run's figures from its client records: vLLM's latency metrics and TokenFlow's streaming
metrics, both measured at the client.

Latencies use the key names of vLLM's result JSON (`mean_ttft_ms`, `median_tpot_ms`,
`p99_itl_ms`, `mean_e2el_ms`, `output_throughput`, ...), so the same dashboards read both.
ITL is per chunk (the gap between chunks that carry tokens), TPOT is per request
((last chunk - first chunk) / (tokens - 1)), E2EL runs from sending to the end of the response.

The streaming metrics feed each request's token arrival times to `tfjax.buffers.Reader` (the
reader model of docs/definitions.md, the one the engine and the simulator use) and summarize
them with `tfjax.qos.summarize`: effective and raw throughput, stall ratio, QoS. Failed
requests are left out of both and counted in `failed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from tfjax.bench.client import RequestRecord, RunTimes
from tfjax.buffers import Reader
from tfjax.qos import TokenTimeline, effective_tokens, summarize

LATENCIES = ("ttft", "tpot", "itl", "e2el")


def reader_of(rec: RequestRecord) -> tuple[Reader, list[float]]:
    """The reader model fed with `rec`'s tokens, and the time each token was read."""
    reader = Reader(rec.rate)
    read_times = []
    for t, n in zip(rec.chunk_times_s, rec.chunk_tokens, strict=True):
        for _ in range(n):
            reader.on_token(t)
            read_times.append(reader.last_read_s)
    return reader, read_times


def timeline_of(rec: RequestRecord) -> TokenTimeline:
    return TokenTimeline(arrival_s=rec.send_s, reader=reader_of(rec)[0], output_len=None)


def latencies_s(ok: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Each latency metric's samples in seconds, over completed requests."""
    return {
        "ttft": [r.chunk_times_s[0] - r.send_s for r in ok],
        "tpot": [
            (r.chunk_times_s[-1] - r.chunk_times_s[0]) / (r.output_tokens - 1)
            for r in ok
            if r.output_tokens > 1
        ],
        "itl": [float(gap) for r in ok for gap in np.diff(r.chunk_times_s)],
        "e2el": [r.end_s - r.send_s for r in ok],
    }


def percentile_stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    """vLLM's mean/median/std/pP keys of one metric, in milliseconds."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:  # None, not NaN: result.json stays strict JSON
        names = ["mean", "median", "std", *(f"p{p:g}" for p in percentiles)]
        return {f"{n}_{name}_ms": None for n in names}
    out = {
        f"mean_{name}_ms": float(np.mean(ms)),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(np.std(ms)),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    records: Sequence[RequestRecord],
    times: RunTimes,
    *,
    percentiles: Sequence[float] = (99,),
    lam: float = 1.0,
    mu: float = 1.0,
) -> dict[str, Any]:
    """The run's metrics: vLLM's keys for the latencies, `tfjax.qos.summarize` for streaming."""
    ok = [r for r in records if r.ok]
    duration_s = times.wall_s
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "client_cpu_s": times.client_cpu_s,
        "client_cpu_per_wall": times.client_cpu_s / duration_s,
    }
    for name, values in latencies_s(ok).items():
        out |= percentile_stats(name, values, percentiles)
    if ok:
        out |= summarize([timeline_of(r) for r in ok], lam=lam, mu=mu)
    out["tokens_added_at_end"] = sum(r.tokens_added_at_end for r in records)
    out["errors"] = sorted({r.error for r in records if r.error})[:10]
    return out


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """One record per request, with its token arrival times and reader-model figures."""
    rows = []
    for r in records:
        row = asdict(r)
        if r.ok:
            t = timeline_of(r)
            row |= {
                "ttft_s": t.ttft_s,
                "stall_s": t.stall_s,
                "effective_tokens": effective_tokens(t),
                "e2el_s": r.end_s - r.send_s,
            }
        rows.append(row)
    return rows
