"""`python -m tfjax.bench.trace_kernels`: device time per kernel name from a profiler trace."""

import gzip
import json
import os
from pathlib import Path

from tfjax.bench import trace_kernels

TRACE = {
    "traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "paged_attention", "ts": 0, "dur": 300},
        {"ph": "X", "pid": 1, "tid": 2, "name": "paged_attention", "ts": 400, "dur": 200},
        {"ph": "X", "pid": 1, "tid": 1, "name": "gemm", "ts": 700, "dur": 100},
        {"ph": "X", "pid": 7, "tid": 3, "name": "step", "ts": 0, "dur": 5000},
        {"ph": "i", "pid": 1, "tid": 1, "name": "marker", "ts": 10},
    ]
}


def write_trace(log_dir: Path, run: str, trace: dict) -> Path:
    path = log_dir / "plugins" / "profile" / run / "host.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as file:
        json.dump(trace, file)
    return path


def test_sums_complete_events_per_name_of_matching_processes():
    totals = trace_kernels.kernel_times(TRACE, "/device:GPU")
    assert dict(totals) == {"/device:GPU:0": {"paged_attention": 500, "gemm": 100}}
    assert dict(trace_kernels.kernel_times(TRACE, "/host")) == {"/host:CPU": {"step": 5000}}


def test_reads_the_newest_trace(tmp_path, capsys):
    old = write_trace(tmp_path, "old", {"traceEvents": []})
    os.utime(old, (0, 0))
    newest = write_trace(tmp_path, "new", TRACE)
    assert trace_kernels.newest_trace(tmp_path) == newest
    assert trace_kernels.main([str(tmp_path), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "/device:GPU:0: 0.6 ms in 2 kernel names" in out
    assert "paged_attention" in out and "gemm" not in out
