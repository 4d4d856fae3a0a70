"""`tfjax bench serve`: the serving benchmark against any OpenAI-compatible server.

Sends `--num-prompts` streaming requests to `--base-url` (tfjax, vLLM, SGLang, llama.cpp's
server: anything that speaks `/v1/completions` or `/v1/chat/completions`) on an arrival
schedule, times every token at the client, and reports vLLM's latency metrics (TTFT, TPOT, ITL,
E2EL; mean, median, std and `--metric-percentiles`) beside TokenFlow's streaming metrics from
the reader model (effective throughput, stall ratio, QoS; docs/definitions.md). `/metrics` is
scraped before and after the run; counters that grew are reported, and `preemptions` is the
growth of the server's preemption counter (ours or vLLM's). `--cpu-of PID ...` reports the CPU
seconds each local process (a server, a router in front of it) used during the run: on a
machine the server keeps busy, a router's share of the cores is what it can take from the
server's throughput, a bound that one run resolves where tok/s noise between runs cannot.

Failed requests (HTTP errors, error events, timeouts, streams without [DONE]) are left out of
the latency and streaming metrics, as in vLLM's benchmark, and counted in `failed`: look at
that number before trusting the others.

Output: the table on stdout, a progress bar on stderr, and with `--save-result`
RESULT_DIR/RESULT_FILENAME.json (vLLM's key names where one exists, plus ours and one record per
request), the same name with .csv (one row per request), and with `--plots` PNG plots.

    tfjax bench serve --base-url http://127.0.0.1:8000 --num-prompts 6 --random-output-len 32
    tfjax bench serve --base-url http://127.0.0.1:8000 --request-rate 2 --burstiness 0.5 \\
        --num-prompts 200 --save-result --result-dir out/bench --plots
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from models.errors import UserError
from tfjax.bench import flags
from tfjax.bench.client import served_model
from tfjax.bench.report import CPU_OF_PID, format_table, save
from tfjax.bench.run import benchmark
from tfjax.bench.workload import workload_summary


def _served_model(base_url: str) -> str:
    try:
        return served_model(base_url)
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise UserError(f"no model listed at {base_url}/v1/models ({err}); pass --model") from err


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux `/proc/PID/stat`)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as err:
        raise UserError(f"--cpu-of {pid}: cannot read the process's CPU time ({err})") from err
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15, in clock ticks
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def vllm_run_keys(args: argparse.Namespace, model: str, num_prompts: int) -> dict[str, Any]:
    """The run's description under the keys of vLLM's result JSON."""
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "model_id": model,
        "num_prompts": num_prompts,
        "request_rate": str(args.request_rate),  # "inf" as vLLM writes it
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
    }


def build_parser(prog: str = "tfjax bench serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=flags.HelpFormatter,
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--save-result", action="store_true", help="write the JSON and CSV")
    parser.add_argument("--result-dir", type=Path, default=Path("."), help="where to save")
    parser.add_argument("--result-filename", default="result", help="NAME of NAME.json/.csv")
    parser.add_argument("--plots", action="store_true", help="also PNG plots (matplotlib)")
    parser.add_argument("--dry-run", action="store_true", help="print the workload, send nothing")
    parser.add_argument(
        "--cpu-of",
        type=int,
        nargs="+",
        default=[],
        metavar="PID",
        help="report the CPU seconds these local processes (server, router) used during the run",
    )
    flags.add_workload_arguments(parser)
    flags.add_client_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    requests = flags.requests_from_args(args)
    print(f"workload: {json.dumps(workload_summary(requests))}", file=sys.stderr)
    if args.dry_run:
        return 0
    model = args.model or _served_model(args.base_url)
    cfg = flags.client_config(args, args.base_url, model)
    percentiles = flags.percentiles_of(args)
    cpu_before = {pid: process_cpu_seconds(pid) for pid in args.cpu_of}
    result, records = asyncio.run(
        benchmark(cfg, requests, percentiles=percentiles, progress=args.progress)
    )
    for pid, before in cpu_before.items():
        result[f"{CPU_OF_PID}{pid}"] = process_cpu_seconds(pid) - before
    result |= vllm_run_keys(args, model, len(requests))
    result["workload"] = flags.args_record(args)
    print(format_table(result))
    if args.save_result or args.plots:
        name = args.result_filename.removesuffix(".json")
        path = save(result, records, args.result_dir, name=name, plots=args.plots)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if result["completed"] else 1
