"""Request streams for the simulator and the benchmarks: synthetic (paper Table 1) and trace replay.

Synthetic: arrivals are a burst (all at `start_s`), Poisson (exponential gaps at `request_rate`)
or gamma (gaps with coefficient of variation `cv`, burstier than Poisson when cv > 1). Input
and output lengths are normal (the paper's Table 1 gives only means; `std` defaults to a
quarter of the mean), rounded and clipped to [1, 2 * mean]. Consumption rates come from a mix
such as "15:0.4,20:0.6": exact shares of the requests, shuffled; a request that declares no
rate gets the server's default (`tfjax serve --default-consumption-rate`, 15), so a mix of
slow declared readers and undeclared ones is e.g. "2:0.5,15:0.5". `streaming=False` makes
every request non-streaming (read at the end). Everything is drawn from one
`random.Random(seed)`, so a spec always gives the same requests.

Trace replay reads the Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`),
optionally skipping the first `skip` requests and keeping `limit`; arrival gaps are multiplied
by `time_scale` (< 1 compresses time, i.e. raises the load) and lengths by `length_scale`.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from tfjax.request import Request, SamplingParams


@dataclass(frozen=True, kw_only=True, slots=True)
class LengthDist:
    """Normal around `mean` (clipped to [1, 2 * mean]), or, with `range_ratio` r, uniform over
    the integers of [mean * (1 - r), mean * (1 + r)] as `vllm bench serve --random-range-ratio`
    draws them."""

    mean: int
    std: float | None = None  # None: mean / 4
    range_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.range_ratio is not None:
            if not 0 <= self.range_ratio < 1:
                raise ValueError(f"range ratio {self.range_ratio} is not in [0, 1)")
            if self.std is not None:
                raise ValueError("a length has a std or a range ratio, not both")

    def sample(self, rng: random.Random) -> int:
        if self.range_ratio is not None:
            low = math.floor(self.mean * (1 - self.range_ratio))
            high = math.ceil(self.mean * (1 + self.range_ratio))
            return max(1, rng.randint(low, high))
        std = self.mean / 4 if self.std is None else self.std
        return max(1, min(2 * self.mean, round(rng.gauss(self.mean, std))))


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkloadSpec:
    arrival: str  # "burst" | "poisson" | "gamma"
    num_requests: int
    input_len: LengthDist
    output_len: LengthDist
    request_rate: float = 1.0  # requests/s (poisson, gamma)
    cv: float = 1.0  # gamma: std / mean of the gaps
    rates: str = "15:0.4,20:0.6"  # consumption rate mix, tokens/s : share
    start_s: float = 0.0
    seed: int = 0
    streaming: bool = True  # False: every client reads its whole answer at the end

    def __post_init__(self) -> None:
        if self.arrival not in ("burst", "poisson", "gamma"):
            raise ValueError(f"unknown arrival pattern {self.arrival!r}")
        if self.num_requests < 1 or self.request_rate <= 0 or self.cv <= 0:
            raise ValueError("num_requests >= 1, request_rate > 0 and cv > 0 required")


def parse_rate_mix(text: str) -> list[tuple[float, float]]:
    """'15:0.4,20:0.6' -> [(15.0, 0.4), (20.0, 0.6)]; a bare '20' means everyone at 20."""
    mix = []
    for part in text.split(","):
        rate, _, share = part.partition(":")
        mix.append((float(rate), float(share) if share else 1.0))
    if any(r <= 0 or s < 0 for r, s in mix) or sum(s for _, s in mix) <= 0:
        raise ValueError(f"bad rate mix {text!r}")
    return mix


def assign_rates(text: str, n: int, rng: random.Random) -> list[float]:
    """Exact shares (largest remainders), shuffled."""
    mix = parse_rate_mix(text)
    total = sum(s for _, s in mix)
    exact = [s / total * n for _, s in mix]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    rates = [rate for (rate, _), c in zip(mix, counts, strict=True) for _ in range(c)]
    rng.shuffle(rates)
    return rates


def _request(
    i: int, arrival_s: float, input_len: int, output_len: int, rate: float, streaming: bool = True
) -> Request:
    return Request(
        request_id=f"r{i:06d}",
        prompt_ids=[1] * input_len,
        sampling=SamplingParams(max_tokens=output_len, ignore_eos=True),
        arrival_s=arrival_s,
        consumption_rate=rate,
        streaming=streaming,
    )


def make_requests(spec: WorkloadSpec) -> list[Request]:
    rng = random.Random(spec.seed)
    t = spec.start_s
    arrivals = []
    for _ in range(spec.num_requests):
        if spec.arrival == "poisson":
            t += rng.expovariate(spec.request_rate)
        elif spec.arrival == "gamma":
            shape = 1.0 / spec.cv**2
            t += rng.gammavariate(shape, 1.0 / (spec.request_rate * shape))
        arrivals.append(t)
    rates = assign_rates(spec.rates, spec.num_requests, rng)
    return [
        _request(
            i,
            arrivals[i],
            spec.input_len.sample(rng),
            spec.output_len.sample(rng),
            rates[i],
            spec.streaming,
        )
        for i in range(spec.num_requests)
    ]


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> seconds since midnight (7 fractional digits)."""
    clock = stamp.split(" ")[1]
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def load_trace(
    path: str | Path,
    *,
    skip: int = 0,
    limit: int | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_input: int | None = None,
    rates: str = "15:0.4,20:0.6",
    seed: int = 0,
) -> list[Request]:
    """Replay an Azure LLM inference trace; the first kept request arrives at t = 0."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[skip : None if limit is None else skip + limit]
    if not rows:
        raise ValueError(f"no rows left in {path} after skip={skip}, limit={limit}")
    t0 = _seconds(rows[0]["TIMESTAMP"])
    rng = random.Random(seed)
    rate_of = assign_rates(rates, len(rows), rng)
    out = []
    for i, row in enumerate(rows):
        n_in = max(1, round(int(row["ContextTokens"]) * length_scale))
        if max_input is not None:
            n_in = min(n_in, max_input)
        n_out = max(1, round(int(row["GeneratedTokens"]) * length_scale))
        arrival = (_seconds(row["TIMESTAMP"]) - t0) * time_scale
        out.append(_request(i, arrival, n_in, n_out, rate_of[i]))
    return out


def load_workload_file(path: str | Path) -> list[Request]:
    """Requests of a workload file (`tfjax simulate --workload`, `tfjax bench sim-vs-live`):

        {"requests": [{"arrival_s": float, "prompt_token_ids": [int, ...] (or
          "prompt_tokens": int), "max_tokens": int, "consumption_rate": float}, ...]}

    Outputs run to `max_tokens` (as with `ignore_eos`). A `prompt_tokens` prompt is made of
    token ids of its own request, so no two requests share a prefix. Raises `ValueError`
    naming the request and field of the first bad entry."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: {e}") from None
    entries = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'requests' must be a non-empty list")
    return [_workload_request(i, entry) for i, entry in enumerate(entries)]


def _workload_request(i: int, entry: object) -> Request:
    def field(name: str, kind: type, ok) -> float:
        value = entry.get(name) if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
            raise ValueError(f"requests[{i}].{name}: bad value {value!r}")
        return value

    if not isinstance(entry, dict):
        raise ValueError(f"requests[{i}]: must be an object")
    known = {"arrival_s", "prompt_token_ids", "prompt_tokens", "max_tokens", "consumption_rate"}
    for name in entry:
        if name not in known:
            raise ValueError(f"requests[{i}].{name}: unknown field")
    if "prompt_token_ids" in entry:
        prompt = entry["prompt_token_ids"]
        if not (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            raise ValueError(f"requests[{i}].prompt_token_ids: must be a non-empty list of ids")
    else:
        length = int(field("prompt_tokens", int, lambda v: v > 0))
        prompt = [3 + (i * 7919 + j) % 30000 for j in range(length)]
    return Request(
        request_id=f"r{i:06d}",
        prompt_ids=list(prompt),
        sampling=SamplingParams(
            max_tokens=int(field("max_tokens", int, lambda v: v > 0)), ignore_eos=True
        ),
        arrival_s=float(field("arrival_s", (int, float), lambda v: v >= 0)),
        consumption_rate=float(field("consumption_rate", (int, float), lambda v: v > 0)),
    )
