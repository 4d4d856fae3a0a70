"""What a serving run leaves behind: the table on stdout, the result JSON, one CSV row per
request, and (on request) PNG plots.

The JSON carries vLLM's key names where one exists (`tfjax.bench.metrics`), the run's
configuration and one record per request with its token arrival times; the CSV has the same
requests without the time lists, for a spreadsheet.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfjax.bench.client import RequestRecord

CSV_COLUMNS = (
    "index",
    "rate",
    "prompt_len",
    "max_tokens",
    "scheduled_s",
    "send_s",
    "end_s",
    "output_tokens",
    "ttft_s",
    "stall_s",
    "effective_tokens",
    "e2el_s",
    "tokens_added_at_end",
    "finish_reason",
    "error",
)

_HEAD_ROWS = (
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Client CPU s per wall s", "client_cpu_per_wall"),
)
CPU_OF_PID = "cpu_s_of_pid_"  # + PID: CPU seconds that process used during the run (--cpu-of)
_LATENCY_SECTIONS = (  # metric, its section's title, its short name
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency (per chunk)", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)
_STREAMING_ROWS = (
    ("Effective throughput (tok/s)", "effective_throughput"),
    ("Raw throughput (tok/s)", "raw_throughput"),
    ("Stall ratio", "stall_ratio"),
    ("Mean stall (s)", "mean_stall_s"),
    ("P99 stall (s)", "p99_stall_s"),
    ("QoS (Eq. 2, lambda=mu=1)", "qos"),
    ("Server preemptions (delta)", "preemptions"),
)


def _table_rows(result: dict[str, Any]) -> list[tuple[str, str] | str]:
    """Section titles (strings) and (label, key) rows: vLLM's layout, with a row for every
    percentile the result holds."""
    rows: list[tuple[str, str] | str] = list(_HEAD_ROWS)
    for key in result:
        if key.startswith(CPU_OF_PID):
            rows.append((f"CPU s of process {key.removeprefix(CPU_OF_PID)}", key))
    for metric, title, short in _LATENCY_SECTIONS:
        rows += [title, (f"Mean {short} (ms)", f"mean_{metric}_ms")]
        rows.append((f"Median {short} (ms)", f"median_{metric}_ms"))
        suffix = f"_{metric}_ms"
        for key in result:
            if key.startswith("p") and key.endswith(suffix) and key[1].isdigit():
                rows.append((f"P{key[1 : -len(suffix)]} {short} (ms)", key))
    return [*rows, "Streaming (reader model, docs/definitions.md)", *_STREAMING_ROWS]


def format_table(result: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """vLLM's result table, plus the streaming section; keys missing from `result` are skipped."""

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"{' ' + title + ' ':=^60}"]
    for row in _table_rows(result):
        if isinstance(row, str):
            lines.append(f"{row:-^60}")
        elif row[1] in result:
            lines.append(f"{row[0] + ':':<44}{fmt(result[row[1]]):>16}")
    lines.append("=" * 60)
    if result.get("errors"):
        lines.append("errors: " + "; ".join(result["errors"]))
    return "\n".join(lines)


def save(
    result: dict[str, Any],
    records: Sequence[RequestRecord],
    out_dir: Path,
    *,
    name: str = "result",
    plots: bool = False,
) -> Path:
    """Write out_dir/NAME.json and out_dir/NAME.csv (and the plots); returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.get("requests", []))
    if plots:
        from tfjax.bench import plots as bench_plots  # matplotlib only when asked for

        bench_plots.plot_run(records, out_dir)
    return path
