"""Where a profiled run's device time went: total time per kernel (or XLA op) name, from the
trace `jax.profiler.trace` wrote (`tfjax bench engine --profile DIR`).

    python -m tfjax.bench.trace_kernels DIR [--top 25] [--process GPU]

Reads the newest DIR/plugins/profile/*/*.trace.json.gz (Chrome trace format) and, for each
process whose name contains `--process` (the device streams on a GPU: "/device:GPU:0"), sums
the durations of its complete events by name. A decode step that is slower than its floor
shows here as the kernels that do not read at full bandwidth, without TensorBoard.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def newest_trace(log_dir: Path) -> Path:
    """The newest trace file `jax.profiler.trace(log_dir)` wrote."""
    traces = sorted((log_dir / "plugins" / "profile").glob("*/*.trace.json.gz"))
    if not traces:
        raise SystemExit(f"no plugins/profile/*/*.trace.json.gz under {log_dir}")
    return max(traces, key=lambda path: path.stat().st_mtime)


def kernel_times(trace: dict, process: str) -> dict[str, collections.Counter]:
    """{process name: Counter(event name -> total microseconds)} for matching processes."""
    names = {
        event["pid"]: event["args"]["name"]
        for event in trace["traceEvents"]
        if event.get("ph") == "M" and event.get("name") == "process_name"
    }
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in trace["traceEvents"]:
        name = names.get(event.get("pid"), "")
        if event.get("ph") == "X" and process in name:
            totals[name][event["name"]] += event.get("dur", 0)
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tfjax.bench.trace_kernels", description=__doc__
    )
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--process", default="/device:GPU", help="substring of process names")
    args = parser.parse_args(argv)
    path = newest_trace(args.log_dir)
    with gzip.open(path) as file:
        totals = kernel_times(json.load(file), args.process)
    if not totals:
        raise SystemExit(f"no process named like {args.process!r} in {path}")
    for process, counter in sorted(totals.items()):
        whole = sum(counter.values())
        print(f"{process}: {whole / 1e3:.1f} ms in {len(counter)} kernel names")
        for name, micros in counter.most_common(args.top):
            print(f"  {micros / 1e3:9.2f} ms {100 * micros / whole:5.1f} %  {name[:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
