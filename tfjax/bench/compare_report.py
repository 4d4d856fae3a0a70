"""The tables of `tfjax bench compare`: contestants side by side with ratios to a baseline.

One summary row per (workload, contestant, repeat) holds the few figures a comparison turns on
(`SUMMARY_KEYS`). `format_comparison` prints every row with each figure's ratio to the baseline
run of the same workload; `format_repeats` prints, per contestant, the median ratio over the
alternating repeats and its min-max range (one run per side cannot resolve 15 % on a 2-core VM,
whose identical runs vary by 15-20 %).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

DEFAULT_BASELINE = "fcfs"
SUMMARY_KEYS = (
    "mean_ttft_s",
    "p99_ttft_s",
    "mean_e2el_ms",
    "effective_throughput",
    "raw_throughput",
    "stall_ratio",
)
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


def _cell(row: dict[str, Any], key: str, base: dict[str, Any] | None) -> str:
    v = row.get(key)
    cell = "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    b = base.get(key) if base else None
    if key in SUMMARY_KEYS and v is not None and b and row is not base:
        cell += f" ({v / b:.2f}x)"
    return cell


def format_comparison(rows: Sequence[dict[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    """Contestants side by side; each summary metric with its ratio to the baseline of the same
    workload."""
    bases = {r.get("workload"): r for r in rows if r["policy"] == baseline and "error" not in r}
    workloads = {r.get("workload") for r in rows}
    label = "workload / policy" if workloads != {None} else "policy"
    head = f"{label:<28}" + "".join(f"{h:>18}" for _, h in _COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        base = bases.get(row.get("workload"))
        cells = "".join(f"{_cell(row, key, base):>18}" for key, _ in _COLUMNS)
        name = row["policy"]
        if row.get("workload") is not None:
            name = f"{row['workload']} / {name}"
        lines.append(f"{name:<28}" + cells + f"  {row.get('error', '')}")
    lines.append(f"(x: ratio to {baseline}; TTFT and stall ratio: lower is better)")
    return "\n".join(lines)


def format_repeats(rows: Sequence[dict[str, Any]], baseline: str = DEFAULT_BASELINE) -> str:
    """Each contestant's ratio to the baseline per metric over the repeats (each repeat's pair
    of runs, back to back): median, and min-max across repeats."""
    base = {r["repeat"]: r for r in rows if r["policy"] == baseline and "error" not in r}
    keys = [(k, h) for k, h in _COLUMNS if k in SUMMARY_KEYS]
    lines = [f"{'policy':<24}" + "".join(f"{h:>24}" for _, h in keys)]
    for label in dict.fromkeys(r["policy"] for r in rows if r["policy"] != baseline):
        cells = []
        for key, _ in keys:
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
    lines.append(f"(ratio to {baseline}: median (min-max) over {len(base)} alternating repeats)")
    return "\n".join(lines)
