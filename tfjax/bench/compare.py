"""`tfjax bench compare`: scheduling policies (or any server commands) side by side on the same
workload, with alternating repeats and median ratios.

For each policy (`tokenflow`, `fcfs`, `andes`; with `--include-no-offload` also `tokenflow
--no-offload`) this starts `tfjax serve` on 127.0.0.1 with a free port and the same model, seed,
workload and server flags; or, with `--server LABEL URL COMMAND` (repeatable), any server
command that serves at URL (vLLM, another tfjax build), ready when its /health answers. Every
server stays up while the `tfjax bench serve` client runs the workload against each in turn,
`--repeat` times (A B, B A, A B, ...: a drifting machine favours neither), then they are
stopped with SIGTERM. It prints a side-by-side table with ratios against the baseline (fcfs,
or the first --server) and, with repeats, each ratio as the median and min-max over the
repeats. It writes DIR/summary.json (one row per run),
DIR/<label>/result.json and .csv (the full serving result) with plots, DIR/workload.json and
DIR/ttft_cdf.png (all contestants).

Workloads (`--workloads`, comma-separated; each in DIR/<workload>/ when there are several):
- `paper`: the workload flags as given; defaults (a burst of 10, 64-token prompts, 80 output
  tokens, rates 0.9:0.4,1.2:0.6 tok/s, 48 KV pages) come from one calibration on the 2-core
  dev VM (2026-11-27: Gamma(1, 2, 4, 8) = 5.7, 11.2, 18.6, 21.4 tok/s through HTTP, R = 4).
  `--calibrate` derives them on this machine instead (`tfjax.bench.calibrate`: a burst the
  KV pool cannot keep resident, whose summed reading rates the decode capacity still covers).
  A new `--kv-pages` changes the KV shapes, so the first start with it compiles for minutes.
- issue 13's ordinary bursts as a plain OpenAI client sends them, on the server's default flags:
  32 requests at once, ~17-token prompts, 64 tokens each (`ignore_eos`). `undeclared`: streamed,
  no `consumption_rate` (the server's default, 15 tok/s); `overloaded`: streamed, each declaring
  15 tok/s; `non-streaming`: `stream: false` (mean E2E latency is the figure that matters);
  `mixed`: half stream declaring 2 tok/s, half undeclared.

    tfjax bench compare --out out/compare --calibrate
    tfjax bench compare --out out/compare13 --policies tokenflow,fcfs \\
        --workloads undeclared,overloaded,non-streaming,mixed --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tfjax.bench import flags
from tfjax.bench.calibrate import RegimeTargets, Workload, derive_workload, measure_capacity
from tfjax.bench.client import RequestRecord, served_model
from tfjax.bench.compare_report import (
    DEFAULT_BASELINE,
    format_comparison,
    format_repeats,
    summary_row,
)
from tfjax.bench.report import format_table, save
from tfjax.bench.run import benchmark
from tfjax.bench.server import Server, command_server, tfjax_server
from tfjax.bench.workload import ClientRequest, synthetic_requests, workload_summary
from tfjax.sim.workload import LengthDist

POLICIES = ("tokenflow", "fcfs", "andes")
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
        drawn = synthetic_requests(
            arrival="burst",
            num_requests=self.num_requests,
            input_len=self.input_len,
            output_len=self.output_len,
            rate_mix=self.rate_mix,
            seed=seed,
        )
        return [replace(r, declared=r.rate in self.declared, stream=self.stream) for r in drawn]


PAPER_WORKLOAD = "paper"
ORDINARY_BURSTS = {
    "undeclared": OrdinaryBurst(rate_mix="15"),
    "overloaded": OrdinaryBurst(rate_mix="15", declared=frozenset({15.0})),
    "non-streaming": OrdinaryBurst(rate_mix="15", stream=False),
    "mixed": OrdinaryBurst(rate_mix="2:0.5,15:0.5", declared=frozenset({2.0})),
}
WORKLOADS = (PAPER_WORKLOAD, *ORDINARY_BURSTS)


@dataclass(frozen=True, kw_only=True)
class Contestant:
    """One side of the comparison: a policy of this checkout's `tfjax serve`, or a command."""

    label: str  # directory and table name
    policy: str = ""
    server_flags: tuple[str, ...] = ()
    command: str = ""  # with base_url: any server command instead of `tfjax serve`
    base_url: str = ""

    def start(self, flags: Sequence[str], log: Path, timeout_s: float) -> AbstractContextManager:
        """The running server (a context manager yielding a `Server`)."""
        if self.command:
            return command_server(self.command, self.base_url, log, timeout_s)
        return tfjax_server(self.policy, [*flags, *self.server_flags], log, timeout_s)


def contestants_from_args(args: argparse.Namespace) -> list[Contestant]:
    if args.server:
        return [Contestant(label=lab, command=cmd, base_url=url) for lab, url, cmd in args.server]
    runs = [Contestant(label=p, policy=p) for p in args.policies.split(",") if p]
    if args.include_no_offload:
        no_offload = ("--no-offload",)
        runs.append(Contestant(label="tokenflow-no-offload", policy="tokenflow",
                               server_flags=no_offload))  # fmt: skip
    return runs


def calibrate(args: argparse.Namespace, out_dir: Path, num_runs: int) -> Workload:
    """Measure decode capacity (on `--calibrate-url`, or an fcfs server), derive the regime."""
    batches = sorted({int(b) for b in args.calibrate_batches.split(",")} | {args.resident})
    print(f"calibrating decode capacity at batch sizes {batches}")
    kwargs = dict(prompt_len=args.random_input_len, output_len=args.calibrate_output_len)
    if args.calibrate_url:
        url = args.calibrate_url.rstrip("/")
        capacity = measure_capacity(url, served_model(url), batches, **kwargs)
    else:
        log = out_dir / "calibrate-server.log"
        with tfjax_server("fcfs", args.common_server_flags, log, args.server_start_timeout) as s:
            capacity = measure_capacity(s.base_url, s.model, batches, **kwargs)
    targets = RegimeTargets(
        resident=args.resident,
        oversubscription=args.oversubscription,
        headroom=args.headroom,
        rate_mix_shape=args.rate_mix,
        input_len=args.random_input_len,
        max_output_len=args.random_output_len,
        page_size=args.page_size,
        run_budget_s=(args.time_budget - num_runs * args.expected_start_s) / num_runs,
    )
    workload = derive_workload(capacity, targets)
    print("derived workload:")
    for line in workload.reasoning:
        print(f"  - {line}")
    (out_dir / "calibration.json").write_text(
        json.dumps({"capacity_tok_s": capacity, "workload": workload.__dict__}, indent=1) + "\n"
    )
    return workload


@dataclass(frozen=True, kw_only=True)
class PreparedWorkload:
    name: str
    out_dir: Path
    flags: tuple[str, ...]  # the servers' flags: workloads that share them share servers
    requests: list[ClientRequest]
    meta: dict[str, Any]  # DIR/workload.json


def _paper_requests(
    args: argparse.Namespace, out_dir: Path, num_runs: int
) -> tuple[list[ClientRequest], int | None]:
    kv_pages = args.kv_pages or DEFAULT_KV_PAGES
    if args.calibrate:
        w = calibrate(args, out_dir, num_runs)
        args.num_prompts, args.random_output_len = w.burst_size, w.output_len
        args.rate_mix, args.request_rate = w.rate_mix, math.inf
        kv_pages = args.kv_pages or w.kv_pages
    return flags.requests_from_args(args), kv_pages


def prepare_workload(
    name: str, args: argparse.Namespace, num_runs: int, out_dir: Path
) -> PreparedWorkload:
    """The requests and server flags of one workload (writes out_dir/workload.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == PAPER_WORKLOAD:
        requests, kv_pages = _paper_requests(args, out_dir, num_runs)
    else:
        kv_pages = args.kv_pages  # None: the server's default pool, as a new user runs it
        requests = ORDINARY_BURSTS[name].requests(args.seed)
    server_flags = list(args.common_server_flags)
    if kv_pages is not None:
        server_flags += ["--kv-pages", str(kv_pages)]
    meta = {"name": name, "kv_pages": kv_pages, "server_flags": server_flags}
    meta |= workload_summary(requests)
    meta["declared"] = sum(r.declared for r in requests)
    meta["streamed"] = sum(r.stream for r in requests)
    meta["args"] = flags.args_record(args)
    (out_dir / "workload.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"workload {name}: {json.dumps(workload_summary(requests))}, kv_pages {kv_pages}")
    return PreparedWorkload(
        name=name, out_dir=out_dir, flags=tuple(server_flags), requests=requests, meta=meta
    )


def start_servers(
    runs: Sequence[Contestant], args: argparse.Namespace, flags: Sequence[str], out_dir: Path
) -> tuple[ExitStack, dict[str, tuple[Server, float]]]:
    """Every contestant's server, started one after the other and kept up together, so that
    `--repeat` can alternate runs between them; returns the stack that stops them and, per
    label, (server, start seconds). A server that does not start is left out."""
    stack = ExitStack()
    servers = {}
    for run in runs:
        t0 = time.monotonic()
        print(f"[{run.label}] starting server ...", flush=True)
        log = out_dir / run.label / "server.log"
        try:
            server = stack.enter_context(run.start(flags, log, args.server_start_timeout))
        except RuntimeError as err:  # the server did not start: record it, go on
            print(f"[{run.label}] {err}", file=sys.stderr)
            continue
        servers[run.label] = (server, time.monotonic() - t0)
        print(f"[{run.label}] ready at {server.base_url} after {servers[run.label][1]:.0f} s")
    return stack, servers


def run_once(
    args: argparse.Namespace, server: Server, requests: Sequence[ClientRequest]
) -> tuple[dict[str, Any], list[RequestRecord]]:
    cfg = flags.client_config(args, server.base_url, server.model)
    percentiles = flags.percentiles_of(args)
    return asyncio.run(benchmark(cfg, requests, percentiles=percentiles, progress=args.progress))


def run_workload(
    w: PreparedWorkload,
    args: argparse.Namespace,
    runs: Sequence[Contestant],
    servers: dict[str, tuple[Server, float]],
) -> list[dict[str, Any]]:
    """Every started server on one workload, `--repeat` times in turn; returns summary rows."""
    rows = [
        {"workload": w.name, "policy": r.label, "repeat": 0}
        | {"error": "server did not start", "failed": len(w.requests)}
        for r in runs
        if r.label not in servers
    ]
    ttfts: dict[str, list[float]] = {}
    for repeat in range(args.repeat):
        for label, (server, start_s) in _turns(servers, repeat):
            result, records = run_once(args, server, w.requests)
            result |= {"workload": w.meta, "policy": label, "repeat": repeat}
            run_dir = w.out_dir / label / (f"repeat{repeat}" if args.repeat > 1 else "")
            save(result, records, run_dir, plots=args.plots)
            print(format_table(result, title=f"{w.name} / {label} / {repeat}"))
            row = summary_row(label, result, start_s)
            rows.append({"workload": w.name, "repeat": repeat} | row)
            ttfts.setdefault(label, []).extend(
                r.chunk_times_s[0] - r.send_s for r in records if r.ok
            )
    (w.out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.plots:
        from tfjax.bench.plots import plot_ttft_cdfs

        plot_ttft_cdfs(ttfts, w.out_dir / "ttft_cdf.png")
    print(format_comparison(rows, args.baseline))
    if args.repeat > 1:
        print(format_repeats(rows, args.baseline))
    return rows


def _turns(servers: dict[str, Any], repeat: int) -> list[tuple[str, Any]]:
    """The servers in their order on even repeats, reversed on odd ones (A B, B A, A B, ...): a
    machine that drifts faster or slower over the run then favours neither server, where
    A B A B always ran B later."""
    turns = list(servers.items())
    return turns[::-1] if repeat % 2 else turns


def run_group(
    workloads: Sequence[PreparedWorkload],
    args: argparse.Namespace,
    runs: Sequence[Contestant],
    servers_dir: Path,
) -> list[dict[str, Any]]:
    """Workloads that share server flags: the servers start once for all of them."""
    stack, servers = start_servers(runs, args, workloads[0].flags, servers_dir)
    with stack:
        return [row for w in workloads for row in run_workload(w, args, runs, servers)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. from `timeout`) raises SystemExit, so the servers are still stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    finish_args(args)
    out_dir: Path = args.out
    runs = contestants_from_args(args)
    t_start = time.monotonic()
    names = args.workload_names
    # One workload keeps its files in DIR itself.
    prepared = [
        prepare_workload(name, args, len(runs), out_dir if len(names) == 1 else out_dir / name)
        for name in names
    ]
    groups: dict[tuple[str, ...], list[PreparedWorkload]] = {}
    for w in prepared:
        groups.setdefault(w.flags, []).append(w)
    rows = []
    for i, group in enumerate(groups.values()):
        servers_dir = group[0].out_dir if len(groups) == 1 else out_dir / f"servers{i}"
        rows += run_group(group, args, runs, servers_dir)
    if len(names) > 1:
        (out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
        print("\nall workloads:")
        print(format_comparison(rows, args.baseline))
    total = time.monotonic() - t_start
    print(f"total {total:.0f} s for {len(runs)} servers; wrote {out_dir / 'summary.json'}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def finish_args(args: argparse.Namespace) -> None:
    """Check the workload names; derive the common server flags and the baseline."""
    args.workload_names = [w for w in args.workloads.split(",") if w]
    if unknown := sorted(set(args.workload_names) - set(WORKLOADS)):
        raise SystemExit(f"unknown workload {', '.join(unknown)}; choose from {WORKLOADS}")
    common = ["--model", args.model, "--page-size", str(args.page_size), "--log-level", "info"]
    if args.max_batch_size is not None:
        common += ["--max-batch-size", str(args.max_batch_size)]
    args.common_server_flags = common + shlex.split(args.server_args)
    if args.baseline is None:
        args.baseline = args.server[0][0] if args.server else DEFAULT_BASELINE


def build_parser(prog: str = "tfjax bench compare") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=flags.HelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--server",
        nargs=3,
        action="append",
        metavar=("LABEL", "URL", "COMMAND"),
        help="compare this server command (serving at URL) instead of policies; repeatable",
    )
    parser.add_argument("--baseline", default=None, help="default: fcfs, or the first --server")
    parser.add_argument("--workloads", default=PAPER_WORKLOAD, help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per workload and server, in turns (A B, B A, A B, ...)",
    )
    parser.add_argument(
        "--include-no-offload", action="store_true", help="also tokenflow --no-offload"
    )
    parser.add_argument("--no-plots", action="store_false", dest="plots")
    _add_server_arguments(parser)
    _add_calibration_arguments(parser)
    flags.add_workload_arguments(parser)
    flags.add_client_arguments(parser)
    parser.set_defaults(
        num_prompts=DEFAULT_BURST,
        random_input_len=DEFAULT_INPUT_LEN,
        random_output_len=DEFAULT_OUTPUT_LEN,
        rate_mix=DEFAULT_RATE_MIX,
        request_timeout=240.0,
    )
    return parser


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    s = parser.add_argument_group("tfjax serve (the same for every policy)")
    s.add_argument("--model", default="default", help="tfjax serve --model")
    s.add_argument("--kv-pages", type=int, default=None, help=f"default {DEFAULT_KV_PAGES}")
    s.add_argument("--max-batch-size", type=int, default=None)
    s.add_argument("--page-size", type=int, default=16)
    s.add_argument("--server-args", default="", help="more `tfjax serve` flags, one string")
    s.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds")


def _add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    c = parser.add_argument_group("calibration (tfjax.bench.calibrate)")
    c.add_argument("--calibrate", action="store_true", help="derive the paper workload")
    c.add_argument("--calibrate-url", default=None, help="measure this server, start none")
    c.add_argument("--calibrate-batches", default="1,2,4,8")
    c.add_argument("--calibrate-output-len", type=int, default=48)
    c.add_argument("--resident", type=int, default=4, help="R: requests the pool keeps")
    c.add_argument("--oversubscription", type=float, default=2.5, help="B / R")
    c.add_argument("--headroom", type=float, default=0.6, help="summed rates / Gamma(R)")
    c.add_argument("--time-budget", type=float, default=600.0, help="seconds for all policies")
    c.add_argument(
        "--expected-start-s", type=float, default=45.0, help="seconds a cached server start takes"
    )
