"""Compare scheduling policies on the live server: one `tfjax serve` per policy, same workload.

For each policy (`tokenflow`, `fcfs`, `andes`; with `--include-no-offload` also `tokenflow
--no-offload`) this starts `tfjax serve` on 127.0.0.1 with a free port and the same model, seed,
workload and server flags, waits for its ready line, and keeps every policy's server up while
`bench_serving`'s client runs the workload against each in turn, `--repeat` times (A B A B ...:
one run per policy cannot resolve 15 % on a 2-core VM, whose identical runs vary by 15-20 %),
then stops them with SIGTERM. With repeats it also prints each ratio to fcfs as the median
and min-max over the repeats. Then it prints a side-by-side table with ratios
against fcfs and writes DIR/summary.json (one row per policy), DIR/<policy>/result.json (the full
bench_serving result) with its plots, DIR/workload.json and DIR/ttft_cdf.png (all policies).

The workload should sit in the paper's regime: the burst holds more requests than the device KV
pool keeps resident at once, while the engine's decode capacity still exceeds the burst's summed
consumption rates, so serving everyone just in time is possible and FCFS instead makes the late
arrivals queue. `--calibrate` derives such a workload on this machine: it starts a server
(policy fcfs, default pool) or uses `--calibrate-url`, measures decode capacity Gamma(b) (tokens/s
with b concurrent streams, in the window when all b are decoding), and then, for a resident set
of R requests (`--resident`):

    burst B      = ceil(oversubscription * R)                  (default 2.5 R)
    mean rate    = headroom * Gamma(R) / B                     (default headroom 0.6; the rate
                   mix keeps its shape and is scaled to this mean)
    output len   = what the slowest reader reads in the time budget per policy
    KV pages     = R * ceil((input + output) / page_size) + 1  (page 0 is padding), rounded up
                   to a multiple of 16 so that repeated calibrations reuse compiled shapes

and prints that reasoning. Without `--calibrate` the workload flags are used as given. Their
defaults come from these rules applied to one calibration on this 2-core machine (2026-11-27,
while other jobs were running, so probably pessimistic): Gamma(1, 2, 4, 8) = 5.7, 11.2, 18.6,
21.4 tok/s through HTTP. With R = 4: B = 10, mean rate 0.6 * 18.6 / 10 = 1.1 tok/s (the paper's
15:20 shape: 0.9 and 1.2 tok/s), 80 output tokens, 4 * ceil(144 / 16) + 1 = 37 -> 48 pages. A
faster machine leaves the workload in the regime (capacity only grows), just less loaded:
calibrate before reading much into the numbers.

A new `--kv-pages` value changes the KV array shapes, so the first server start with it compiles
for minutes (later starts hit the XLA cache); the time budget covers the runs, not that compile.

`--workloads` runs more workloads one after the other (each in DIR/<workload>/, a table each
and a combined table at the end). `paper` is the workload above; the others are issue 13's
ordinary bursts as a plain OpenAI client sends them, on the server's default flags (default
KV pool and batch cap; `--kv-pages` only if given): 32 requests at once, ~17-token prompts,
64 tokens each (`ignore_eos`):
- `undeclared`: streamed, no `consumption_rate` (the server's --default-consumption-rate, 15);
- `overloaded`: streamed, each declaring 15 tok/s (480 tok/s against ~110 a batch of 32 makes
  on this CPU);
- `non-streaming`: `stream: false`, no rate: the mean E2E latency is the figure that matters;
- `mixed`: half stream declaring 2 tok/s (slow readers), half undeclared.
The reader model scores undeclared streams at 15 tok/s, what the server assumed for them.

    .venv/bin/python scripts/compare_policies.py --out out/compare --calibrate
    .venv/bin/python scripts/compare_policies.py --out out/compare13 --policies tokenflow,fcfs \
        --workloads undeclared,overloaded,non-streaming,mixed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import _bench_plots
import bench_serving as bench
import workload_client as wc
from workload_client import ClientRequest

from tfjax.sim.workload import LengthDist, parse_rate_mix

REPO = Path(__file__).resolve().parents[1]
READY = re.compile(r"tfjax serving (?P<model>.+) on (?P<url>http://\S+)")
POLICIES = ("tokenflow", "fcfs", "andes")
BASELINE = "fcfs"
SUMMARY_KEYS = (
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_e2el_ms",
    "effective_throughput",
    "raw_throughput",
    "stall_ratio",
)

# The default workload, derived in the module docstring.
DEFAULT_BURST = 10
DEFAULT_INPUT_LEN = 64
DEFAULT_OUTPUT_LEN = 80
DEFAULT_RATE_MIX = "0.9:0.4,1.2:0.6"
DEFAULT_KV_PAGES = 48


@dataclass(frozen=True, kw_only=True)
class OrdinaryBurst:
    """Issue 13's burst: what a plain OpenAI client sends to a server on default flags."""

    rate_mix: str  # the reader model's rates (undeclared streams: the server default, 15)
    declared: frozenset[float] = frozenset()  # rates sent as consumption_rate; others are not
    stream: bool = True
    num_requests: int = 32
    input_len: LengthDist = LengthDist(mean=17, std=2)
    output_len: LengthDist = LengthDist(mean=64, std=0)

    def requests(self, seed: int) -> list[ClientRequest]:
        drawn = wc.synthetic_requests(
            arrival="burst",
            num_requests=self.num_requests,
            input_len=self.input_len,
            output_len=self.output_len,
            rate_mix=self.rate_mix,
            seed=seed,
        )
        return [replace(r, declared=r.rate in self.declared, stream=self.stream) for r in drawn]


PAPER_WORKLOAD = "paper"  # the calibrated paper regime of the module docstring
ORDINARY_BURSTS = {
    "undeclared": OrdinaryBurst(rate_mix="15"),
    "overloaded": OrdinaryBurst(rate_mix="15", declared=frozenset({15.0})),
    "non-streaming": OrdinaryBurst(rate_mix="15", stream=False),
    "mixed": OrdinaryBurst(rate_mix="2:0.5,15:0.5", declared=frozenset({2.0})),
}
WORKLOADS = (PAPER_WORKLOAD, *ORDINARY_BURSTS)


@dataclass(frozen=True, kw_only=True)
class PolicyRun:
    label: str  # directory and table name
    policy: str
    server_flags: tuple[str, ...] = ()


def policy_runs(names: Sequence[str], include_no_offload: bool) -> list[PolicyRun]:
    runs = [PolicyRun(label=n, policy=n) for n in names]
    if include_no_offload:
        runs.append(
            PolicyRun(
                label="tokenflow-no-offload", policy="tokenflow", server_flags=("--no-offload",)
            )
        )
    return runs


@contextmanager
def serve(
    policy: str, flags: Sequence[str], log_path: Path, start_timeout_s: float
) -> Iterator[tuple[str, str]]:
    """Run `tfjax serve` until the block ends; yields (base URL, served model name).

    Stdout is read on a thread (it carries only the ready line, but must never fill its pipe);
    stderr goes to `log_path`. On exit: SIGTERM, wait, and kill only if it does not stop.
    """
    cmd = [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--policy",
        policy,
        *flags,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        print(f"$ {shlex.join(cmd)}", file=log, flush=True)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        try:
            yield _wait_ready(proc, start_timeout_s, log_path)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen, timeout_s: float, log_path: Path) -> tuple[str, str]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            break
        if match := READY.search(line):
            return match.group("url"), match.group("model")
    raise RuntimeError(f"server not ready (exit code {proc.poll()}); see {log_path}")


def _stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def steady_decode_rate(records: Sequence[bench.RequestRecord]) -> float:
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
    cfg = bench.ClientConfig(base_url=base_url, model=model, request_timeout_s=300)
    capacity = {}
    for b in batch_sizes:
        reqs = [
            ClientRequest(
                index=i, arrival_s=0.0, prompt_len=prompt_len, output_len=output_len, rate=1000.0
            )
            for i in range(b)
        ]
        records, _ = asyncio.run(bench.run_requests(cfg, reqs, progress=False))
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


def derive_workload(
    capacity: dict[int, float],
    *,
    resident: int,
    oversubscription: float,
    headroom: float,
    rate_mix_shape: str,
    input_len: int,
    max_output_len: int,
    page_size: int,
    run_budget_s: float,
) -> Workload:
    """The paper's regime on this machine, from measured capacity (see the module docstring)."""
    if resident not in capacity:
        raise ValueError(f"--resident {resident} was not measured: {sorted(capacity)}")
    gamma = capacity[resident]
    burst = math.ceil(oversubscription * resident)
    mean_rate = headroom * gamma / burst
    mix = parse_rate_mix(rate_mix_shape)
    shape_mean = sum(r * s for r, s in mix) / sum(s for _, s in mix)
    scaled = [(round(r * mean_rate / shape_mean, 1), s) for r, s in mix]
    rate_mix = ",".join(f"{r:g}:{s:g}" for r, s in scaled)
    slowest = min(r for r, _ in scaled)
    # The slowest reader needs output/slowest seconds; leave 40% of the budget for TTFT waits.
    output_len = max(16, min(max_output_len, int(0.6 * run_budget_s * slowest)))
    pages_each = math.ceil((input_len + output_len) / page_size)
    kv_pages = 16 * math.ceil((resident * pages_each + 1) / 16)
    reasoning = (
        f"decode capacity with R = {resident} resident streams: Gamma(R) = {gamma:.1f} tok/s",
        f"burst B = ceil({oversubscription:g} * R) = {burst} requests > R: the pool cannot keep "
        "the whole burst resident",
        f"mean consumption rate = {headroom:g} * Gamma(R) / B = {mean_rate:.2f} tok/s, so the "
        f"burst reads {burst * mean_rate:.1f} tok/s < Gamma(R): just-in-time service is possible",
        f"rate mix {rate_mix_shape} scaled to that mean: {rate_mix}",
        f"output length {output_len} (cap {max_output_len}): the slowest reader "
        f"({slowest:g} tok/s) reads it in {output_len / slowest:.0f} s of the {run_budget_s:.0f} s "
        "budget per policy",
        f"KV pages = R * ceil(({input_len} + {output_len}) / {page_size}) + 1 = "
        f"{resident * pages_each + 1}, rounded up to {kv_pages}",
        f"FCFS decodes the first ~R at {gamma / resident:.1f} tok/s each; later arrivals wait "
        f"about {output_len / (gamma / resident):.0f} s per wave of R",
    )
    return Workload(
        burst_size=burst,
        input_len=input_len,
        output_len=output_len,
        rate_mix=rate_mix,
        kv_pages=kv_pages,
        reasoning=reasoning,
    )


def calibrate(args: argparse.Namespace, out_dir: Path, num_policies: int) -> Workload:
    batches = sorted({int(b) for b in args.calibrate_batches.split(",")} | {args.resident})
    print(f"calibrating decode capacity at batch sizes {batches}")
    kwargs = dict(prompt_len=args.input_len_mean, output_len=args.calibrate_output_len)
    if args.calibrate_url:
        url = args.calibrate_url.rstrip("/")
        capacity = measure_capacity(url, bench.served_model(url), batches, **kwargs)
    else:
        log = out_dir / "calibrate-server.log"
        with serve("fcfs", args.common_server_flags, log, args.server_start_timeout) as server:
            capacity = measure_capacity(*server, batches, **kwargs)
    run_budget = (args.time_budget - num_policies * args.expected_start_s) / num_policies
    workload = derive_workload(
        capacity,
        resident=args.resident,
        oversubscription=args.oversubscription,
        headroom=args.headroom,
        rate_mix_shape=args.rate_mix,
        input_len=args.input_len_mean,
        max_output_len=args.output_len_mean,
        page_size=args.page_size,
        run_budget_s=run_budget,
    )
    print("derived workload:")
    for line in workload.reasoning:
        print(f"  - {line}")
    (out_dir / "calibration.json").write_text(
        json.dumps({"capacity_tok_s": capacity, "workload": workload.__dict__}, indent=1) + "\n"
    )
    return workload


def summary_row(label: str, result: dict[str, Any], start_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": label}
    row |= {k: result.get(k) for k in SUMMARY_KEYS}
    row["preemptions"] = result.get("preemptions")
    row |= {
        "completed": result["completed"],
        "failed": result["failed"],
        "server_start_s": start_s,
        "duration_s": result["duration"],
    }
    return row


_COLUMNS = (  # summary key, header
    ("mean_ttft_s", "mean TTFT s"),
    ("p99_ttft_s", "p99 TTFT s"),
    ("mean_e2el_ms", "mean E2E ms"),
    ("effective_throughput", "eff tok/s"),
    ("raw_throughput", "raw tok/s"),
    ("stall_ratio", "stall ratio"),
    ("preemptions", "preempt"),
    ("failed", "failed"),
)


def format_comparison(rows: Sequence[dict[str, Any]]) -> str:
    """Policies side by side; each summary metric with its ratio to fcfs of the same workload."""
    bases = {r.get("workload"): r for r in rows if r["policy"] == BASELINE and "error" not in r}
    workloads = {r.get("workload") for r in rows}
    label = "workload / policy" if workloads != {None} else "policy"
    head = f"{label:<28}" + "".join(f"{h:>18}" for _, h in _COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        base = bases.get(row.get("workload"))
        cells = []
        for key, _ in _COLUMNS:
            v = row.get(key)
            cell = "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
            b = base.get(key) if base else None
            if key in SUMMARY_KEYS and v is not None and b and row is not base:
                cell += f" ({v / b:.2f}x)"
            cells.append(f"{cell:>18}")
        name = row["policy"]
        if row.get("workload") is not None:
            name = f"{row['workload']} / {name}"
        lines.append(f"{name:<28}" + "".join(cells) + f"  {row.get('error', '')}")
    lines.append(f"(x: ratio to {BASELINE}; TTFT and stall ratio: lower is better)")
    return "\n".join(lines)


def start_servers(
    runs: Sequence[PolicyRun], args: argparse.Namespace, flags: Sequence[str], out_dir: Path
) -> tuple[ExitStack, dict[str, tuple[str, str, float]]]:
    """Every policy's server, started one after the other and kept up together, so that
    `--repeat` can alternate bursts between them; returns the stack that stops them and, per
    run label, (base URL, model, start seconds). A server that does not start is left out."""
    stack = ExitStack()
    servers = {}
    for run in runs:
        t0 = time.monotonic()
        print(f"[{run.label}] starting server ...", flush=True)
        log = out_dir / run.label / "server.log"
        try:
            cm = serve(run.policy, [*flags, *run.server_flags], log, args.server_start_timeout)
            url, model = stack.enter_context(cm)
        except RuntimeError as err:  # the server did not start: record it, go on
            print(f"[{run.label}] {err}", file=sys.stderr)
            continue
        servers[run.label] = (url, model, time.monotonic() - t0)
        print(f"[{run.label}] ready at {url} after {servers[run.label][2]:.0f} s", flush=True)
    return stack, servers


def run_burst(
    args: argparse.Namespace, url: str, model: str, requests: Sequence[ClientRequest]
) -> tuple[dict[str, Any], list[bench.RequestRecord]]:
    cfg = bench.client_config(args, url, model)
    one_run = bench.benchmark(
        cfg, requests, percentiles=bench.percentiles_of(args), progress=args.progress
    )
    return asyncio.run(one_run)


def format_repeats(rows: Sequence[dict[str, Any]]) -> str:
    """Each policy's ratio to fcfs per metric over the repeats (each repeat's pair of runs,
    back to back): median, and min-max across repeats."""
    base = {r["repeat"]: r for r in rows if r["policy"] == BASELINE and "error" not in r}
    lines = [f"{'policy':<24}" + "".join(f"{h:>24}" for k, h in _COLUMNS if k in SUMMARY_KEYS)]
    for label in dict.fromkeys(r["policy"] for r in rows if r["policy"] != BASELINE):
        cells = []
        for key, _ in _COLUMNS:
            if key not in SUMMARY_KEYS:
                continue
            ratios = sorted(
                r[key] / base[r["repeat"]][key]
                for r in rows
                if r["policy"] == label
                and r["repeat"] in base
                and r.get(key) is not None
                and base[r["repeat"]].get(key)
            )
            cell = "n/a"
            if ratios:
                cell = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"
            cells.append(f"{cell:>24}")
        lines.append(f"{label:<24}" + "".join(cells))
    lines.append(f"(ratio to {BASELINE}: median (min-max) over {len(base)} alternating repeats)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=bench.HelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--workloads",
        default=PAPER_WORKLOAD,
        help=f"comma-separated, of {', '.join(WORKLOADS)} (see the description)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each workload per policy; the policies' servers stay up and take turns "
        "(A B A B ...), and the ratios to fcfs are reported as median (min-max)",
    )
    parser.add_argument(
        "--include-no-offload",
        action="store_true",
        help="also run tokenflow --no-offload (recompute only)",
    )
    s = parser.add_argument_group("server (the same for every policy)")
    s.add_argument("--model", default="default", help="tfjax serve --model")
    s.add_argument("--kv-pages", type=int, default=None, help=f"default {DEFAULT_KV_PAGES}")
    s.add_argument("--max-batch-size", type=int, default=None)
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--server-args", default="", help="more `tfjax serve` flags, one string")
    s.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds")
    c = parser.add_argument_group("calibration")
    c.add_argument(
        "--calibrate", action="store_true", help="derive the workload (see the description)"
    )
    c.add_argument("--calibrate-url", default=None, help="measure this server, start none")
    c.add_argument("--calibrate-batches", default="1,2,4,8")
    c.add_argument("--calibrate-output-len", type=int, default=48)
    c.add_argument("--resident", type=int, default=4, help="R: requests the pool keeps")
    c.add_argument("--oversubscription", type=float, default=2.5, help="B / R")
    c.add_argument("--headroom", type=float, default=0.6, help="summed rates / Gamma(R)")
    c.add_argument("--time-budget", type=float, default=600.0, help="seconds for all policies")
    c.add_argument(
        "--expected-start-s",
        type=float,
        default=45.0,
        help="seconds a cached server start takes (budget planning)",
    )
    wc.add_workload_arguments(parser)
    bench.add_client_arguments(parser)
    parser.set_defaults(
        burst_size=DEFAULT_BURST,
        input_len_mean=DEFAULT_INPUT_LEN,
        output_len_mean=DEFAULT_OUTPUT_LEN,
        rate_mix=DEFAULT_RATE_MIX,
        request_timeout=240.0,
    )
    args = parser.parse_args(argv)
    args.workload_names = [w for w in args.workloads.split(",") if w]
    if unknown := sorted(set(args.workload_names) - set(WORKLOADS)):
        parser.error(f"unknown workload {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    common = ["--model", args.model, "--page-size", str(args.page_size), "--log-level", "info"]
    if args.max_batch_size is not None:
        common += ["--max-batch-size", str(args.max_batch_size)]
    args.common_server_flags = common + shlex.split(args.server_args)
    return args


@dataclass(frozen=True, kw_only=True)
class PreparedWorkload:
    name: str
    out_dir: Path
    flags: tuple[str, ...]  # the servers' flags: workloads that share them share servers
    requests: list[ClientRequest]
    meta: dict[str, Any]  # DIR/workload.json


def prepare_workload(
    name: str, args: argparse.Namespace, runs: Sequence[PolicyRun], out_dir: Path
) -> PreparedWorkload:
    """The requests and server flags of one workload (writes out_dir/workload.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == PAPER_WORKLOAD:
        kv_pages = args.kv_pages or DEFAULT_KV_PAGES
        if args.calibrate:
            w = calibrate(args, out_dir, len(runs))
            args.burst_size, args.output_len_mean, args.rate_mix = (
                w.burst_size,
                w.output_len,
                w.rate_mix,
            )
            args.arrival = "burst"
            kv_pages = args.kv_pages or w.kv_pages
        requests = wc.requests_from_args(args)
    else:
        kv_pages = args.kv_pages  # None: the server's default pool, as a new user runs it
        requests = ORDINARY_BURSTS[name].requests(args.seed)
    flags = list(args.common_server_flags)
    if kv_pages is not None:
        flags += ["--kv-pages", str(kv_pages)]
    meta = {"name": name, "kv_pages": kv_pages, "server_flags": flags}
    meta |= wc.workload_summary(requests)
    meta["declared"] = sum(r.declared for r in requests)
    meta["streamed"] = sum(r.stream for r in requests)
    meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out_dir / "workload.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"workload {name}: {json.dumps(wc.workload_summary(requests))}, kv_pages {kv_pages}")
    return PreparedWorkload(
        name=name, out_dir=out_dir, flags=tuple(flags), requests=requests, meta=meta
    )


def run_workloads(
    workloads: Sequence[PreparedWorkload],
    args: argparse.Namespace,
    runs: Sequence[PolicyRun],
    servers_dir: Path,
) -> list[dict[str, Any]]:
    """Every policy on workloads that share server flags: the policies' servers start once and
    take turns (A B A B ...) on each workload, `--repeat` times; returns the summary rows
    (also in each workload's DIR/summary.json)."""
    all_rows = []
    stack, servers = start_servers(runs, args, workloads[0].flags, servers_dir)
    with stack:
        for w in workloads:
            rows, ttfts = [], {}
            rows += [
                {"workload": w.name, "policy": r.label, "repeat": 0}
                | {"error": "server did not start", "failed": len(w.requests)}
                for r in runs
                if r.label not in servers
            ]
            for repeat in range(args.repeat):
                for label, (url, model, start_s) in servers.items():
                    result, records = run_burst(args, url, model, w.requests)
                    result |= {"workload": w.meta, "policy": label, "repeat": repeat}
                    run_dir = w.out_dir / label / (f"repeat{repeat}" if args.repeat > 1 else "")
                    bench.save(result, records, run_dir, plots=args.plots)
                    print(bench.format_table(result, title=f"{w.name} / {label} / {repeat}"))
                    row = summary_row(label, result, start_s)
                    rows.append({"workload": w.name, "repeat": repeat} | row)
                    ttfts.setdefault(label, []).extend(
                        r.chunk_times_s[0] - r.send_s for r in records if r.ok
                    )
            (w.out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
            if args.plots:
                _bench_plots.plot_ttft_cdfs(ttfts, w.out_dir / "ttft_cdf.png")
            print(format_comparison(rows))
            if args.repeat > 1:
                print(format_repeats(rows))
            all_rows += rows
    return all_rows


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (e.g. from `timeout`) raises SystemExit, so `serve` still stops the server.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args(argv)
    out_dir: Path = args.out
    runs = policy_runs([p for p in args.policies.split(",") if p], args.include_no_offload)
    t_start = time.monotonic()
    names = args.workload_names
    # One workload keeps the old layout (files in DIR itself).
    prepared = [
        prepare_workload(name, args, runs, out_dir if len(names) == 1 else out_dir / name)
        for name in names
    ]
    groups: dict[tuple[str, ...], list[PreparedWorkload]] = {}
    for w in prepared:
        groups.setdefault(w.flags, []).append(w)
    rows = []
    for i, group in enumerate(groups.values()):
        servers_dir = group[0].out_dir if len(groups) == 1 else out_dir / f"servers{i}"
        rows += run_workloads(group, args, runs, servers_dir)
    if len(names) > 1:
        (out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
        print("\nall workloads:")
        print(format_comparison(rows))
    total = time.monotonic() - t_start
    print(f"total {total:.0f} s for {len(runs)} policies; wrote {out_dir / 'summary.json'}")
    if total > args.time_budget * len(names):
        print(f"warning: over the {args.time_budget:.0f} s budget per workload", file=sys.stderr)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
