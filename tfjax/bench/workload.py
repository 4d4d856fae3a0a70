"""The requests an HTTP benchmark sends: when, how long, how fast they are read, what prompt.

Synthetic arrivals (burst, Poisson, gamma), the normal length distributions and the consumption
rate mixes come from `tfjax.sim.workload`, so the simulator and the live benchmarks draw the
same requests from the same spec and seed. This module adds what only a client needs:

- Trace replay beyond the simulator's Azure reader: CSV or JSONL files in either of two column
  layouts, the Azure LLM inference trace (`TIMESTAMP` as a date-time, `ContextTokens`,
  `GeneratedTokens`) and BurstGPT (`Timestamp` in seconds, `Request tokens`, `Response tokens`;
  rows with no response tokens are failed requests in BurstGPT and are skipped, as vLLM's
  BurstGPT loader does), or plain `timestamp`/`input_len`/`output_len`. A trace is sliced by
  time (`start_s`, `duration_s`, in trace seconds from its first row) before gaps are scaled.
- Prompts: random token-id lists (our server and vLLM accept a list of ints as `prompt`), or
  for servers that need text, random common English words, one word per intended token: with
  BPE tokenizers a common word with its leading space is usually one token, so the prompt length
  is approximate in text mode.
- Shared prefixes: `shared_prefix_len` leading tokens that every request of a run has in
  common (vLLM's `--random-prefix-len`), so a prefix cache can reuse them.

The flags that choose a workload live in `tfjax.bench.flags`; everything here is
deterministic for a seed.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tfjax.sim.workload import LengthDist, WorkloadSpec, assign_rates, make_requests

DEFAULT_NUM_PROMPTS = 32
TOKEN_ID_RANGE = (100, 10_000)  # inside every common vocabulary, past most special tokens
_WORDS_TEXT = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part"
)
_WORDS = _WORDS_TEXT.split()

# Column names of each trace layout: (timestamp, input tokens, output tokens).
_LAYOUTS = (
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),  # Azure LLM inference 2023
    ("Timestamp", "Request tokens", "Response tokens"),  # BurstGPT
    ("timestamp", "input_len", "output_len"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientRequest:
    """One request of a benchmark run; `arrival_s` counts from the start of the run."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int  # max_tokens, forced with ignore_eos
    rate: float  # consumption rate, tokens/s (the reader model's, also when not declared)
    declared: bool = True  # False: the request sends no consumption_rate (server default)
    stream: bool = True  # False: a non-streaming call, every token arrives at the end
    prompt_ids: tuple[int, ...] = ()  # the exact prompt (a workload file's); () drawn at random
    shared_prefix_len: int = 0  # leading prompt tokens every request of the run shares


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceRow:
    timestamp_s: float
    input_len: int
    output_len: int


def synthetic_requests(
    *,
    arrival: str,
    num_requests: int,
    input_len: LengthDist,
    output_len: LengthDist,
    request_rate: float = 1.0,
    burstiness: float = 1.0,
    rate_mix: str = "15:0.4,20:0.6",
    seed: int = 0,
) -> list[ClientRequest]:
    """Burst / Poisson / gamma arrivals through `tfjax.sim.workload.make_requests`.

    `burstiness` is vLLM's gamma shape k (1: Poisson, < 1 burstier); the simulator's spec uses
    the coefficient of variation of the gaps, which for a gamma law is 1 / sqrt(k).
    """
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    spec = WorkloadSpec(
        arrival=arrival,
        num_requests=num_requests,
        input_len=input_len,
        output_len=output_len,
        request_rate=request_rate,
        cv=1.0 / math.sqrt(burstiness),
        rates=rate_mix,
        seed=seed,
    )
    return [
        ClientRequest(
            index=i,
            arrival_s=r.arrival_s,
            prompt_len=r.num_prompt_tokens,
            output_len=r.sampling.max_tokens,
            rate=r.consumption_rate,
        )
        for i, r in enumerate(make_requests(spec))
    ]


def read_trace(path: str | Path) -> list[TraceRow]:
    """Rows of a CSV or JSONL trace in any of the known layouts, sorted by time."""
    path = Path(path)
    with open(path, newline="") as f:
        if path.suffix in (".jsonl", ".ndjson"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = list(csv.DictReader(f))
    if not records:
        raise ValueError(f"{path}: no rows")
    keys = set(records[0])
    layout = next((cols for cols in _LAYOUTS if set(cols) <= keys), None)
    if layout is None:
        known = " | ".join(", ".join(cols) for cols in _LAYOUTS)
        raise ValueError(f"{path}: unknown columns {sorted(keys)}; expected one of: {known}")
    ts_key, in_key, out_key = layout
    rows = [
        TraceRow(
            timestamp_s=_seconds(rec[ts_key]),
            input_len=int(float(rec[in_key])),
            output_len=int(float(rec[out_key])),
        )
        for rec in records
    ]
    rows = [r for r in rows if r.output_len > 0]
    rows.sort(key=lambda r: r.timestamp_s)
    return rows


def _seconds(value: str | float | int) -> float:
    """Seconds from a number or an ISO date-time ('2023-11-16 18:15:46.6805900')."""
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    stamp = value.strip()
    date, _, frac = stamp.partition(".")
    whole = datetime.fromisoformat(date).timestamp()  # naive: local time, differences only
    return whole + (float("0." + frac) if frac else 0.0)


def trace_requests(
    rows: list[TraceRow],
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    rate_mix: str = "15:0.4,20:0.6",
    seed: int = 0,
) -> list[ClientRequest]:
    """Slice a trace by time (trace seconds from its first row), then scale it.

    Arrival gaps are multiplied by `time_scale` (< 1 compresses time, raising the load) and
    lengths by `length_scale`; the first kept request arrives at 0.
    """
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time_scale and length_scale must be > 0")
    if not rows:
        raise ValueError("empty trace")
    t_first = rows[0].timestamp_s
    lo = t_first + start_s
    hi = math.inf if duration_s is None else lo + duration_s
    kept = [r for r in rows if lo <= r.timestamp_s < hi][:limit]
    if not kept:
        raise ValueError(f"no trace rows in [{start_s}, {start_s + (duration_s or math.inf)}) s")
    rates = assign_rates(rate_mix, len(kept), random.Random(seed))
    t0 = kept[0].timestamp_s
    out = []
    for i, row in enumerate(kept):
        n_in = max(1, round(row.input_len * length_scale))
        n_out = max(1, round(row.output_len * length_scale))
        if max_input_len is not None:
            n_in = min(n_in, max_input_len)
        if max_output_len is not None:
            n_out = min(n_out, max_output_len)
        arrival = (row.timestamp_s - t0) * time_scale
        out.append(
            ClientRequest(
                index=i, arrival_s=arrival, prompt_len=n_in, output_len=n_out, rate=rates[i]
            )
        )
    return out


def make_prompt(req: ClientRequest, *, mode: str, seed: int) -> list[int] | str:
    """The prompt of `req`: `mode` "ids" (token ids) or "text"; the same for the same seed.

    Its first `req.shared_prefix_len` tokens (or words) depend on the seed only, so every
    request of a run starts with the same prefix; the rest depends on the request's index."""
    if req.prompt_ids:
        return list(req.prompt_ids)
    shared = min(req.shared_prefix_len, req.prompt_len)
    head = _draw(random.Random(f"{seed}/prefix"), shared, mode)
    tail = _draw(random.Random(f"{seed}/{req.index}"), req.prompt_len - shared, mode)
    return head + tail if mode == "ids" else " ".join(head + tail)


def _draw(rng: random.Random, n: int, mode: str) -> list:
    if mode == "ids":
        lo, hi = TOKEN_ID_RANGE
        return [rng.randrange(lo, hi) for _ in range(n)]
    if mode == "text":
        return [rng.choice(_WORDS) for _ in range(n)]
    raise ValueError(f"unknown prompt mode {mode!r}")


def workload_summary(requests: Sequence[ClientRequest]) -> dict[str, Any]:
    """A few figures of a workload, to print and store with its results."""
    rates = [r.rate for r in requests]
    return {
        "num_requests": len(requests),
        "last_arrival_s": max(r.arrival_s for r in requests),
        "mean_prompt_len": sum(r.prompt_len for r in requests) / len(requests),
        "mean_output_len": sum(r.output_len for r in requests) / len(requests),
        "sum_consumption_rate": float(sum(rates)),
        "rates": sorted(set(rates)),
    }
