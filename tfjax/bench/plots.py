"""PNG plots of live benchmark runs (matplotlib's `Figure` without pyplot: no display, no
global figure state).

`plot_run` draws one run from its client records: token timelines of sampled requests with the
reader-model line (paper Fig. 18), the TTFT CDF, and buffer levels over time. `plot_ttft_cdfs`
overlays several runs (one per policy) for `tfjax bench compare`. Read times come from
`tfjax.bench.metrics.reader_of`, i.e. from `tfjax.buffers.Reader`, never from a second copy of
the reader model. matplotlib is imported only by this module, and only when plots are asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tfjax.bench.client import RequestRecord
from tfjax.bench.metrics import reader_of

MAX_TIMELINES = 8


def _sample(records: Sequence[RequestRecord], k: int = MAX_TIMELINES) -> list:
    """Up to k completed requests spread over the arrival order (first and last included)."""
    ok = sorted((r for r in records if r.ok), key=lambda r: r.send_s)
    if len(ok) <= k:
        return ok
    return [ok[i] for i in np.linspace(0, len(ok) - 1, k).round().astype(int)]


def _token_times(rec: RequestRecord) -> tuple[np.ndarray, np.ndarray]:
    gen = np.repeat(rec.chunk_times_s, rec.chunk_tokens)
    return gen, np.asarray(reader_of(rec)[1])


def plot_timelines(records: Sequence[RequestRecord], path: Path) -> None:
    """Tokens received (solid) and read by the reader model (dashed) of sampled requests."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, rec in enumerate(_sample(records)):
        gen, read = _token_times(rec)
        color = f"C{i % 10}"
        n = np.arange(1, gen.size + 1)
        ax.step(gen, n, where="post", color=color, label=f"#{rec.index} ({rec.rate:g} tok/s)")
        ax.plot(read, n, "--", color=color, linewidth=0.8)
        ax.plot([rec.send_s], [0], "o", color=color, markersize=3)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("tokens")
    ax.set_title("Token timelines: received (solid) vs read (dashed), dot = sent")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_ttft_cdfs(ttfts_s: Mapping[str, Sequence[float]], path: Path) -> None:
    """One TTFT CDF per label (a run or a policy)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, values in ttfts_s.items():
        xs = np.sort(np.asarray(values, dtype=np.float64))
        if xs.size:
            ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_buffers(records: Sequence[RequestRecord], path: Path) -> None:
    """Unread tokens B(t) of sampled requests (top) and summed over all requests (bottom)."""
    ok = [r for r in records if r.ok]
    if not ok:
        return
    end = max(r.end_s for r in ok)
    grid = np.linspace(0.0, end, 400)

    def buffer_of(rec: RequestRecord) -> np.ndarray:
        gen, read = _token_times(rec)
        return np.searchsorted(gen, grid, "right") - np.searchsorted(read, grid, "right")

    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, rec in enumerate(_sample(ok)):
        top.plot(grid, buffer_of(rec), color=f"C{i % 10}", label=f"#{rec.index}")
    top.set_ylabel("buffer (tokens)")
    top.legend(fontsize=7, ncol=2)
    bottom.plot(grid, sum(buffer_of(r) for r in ok), color="k")
    bottom.set_ylabel("all requests (tokens)")
    bottom.set_xlabel("time since start (s)")
    top.set_title("Reader buffers over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_run(records: Sequence[RequestRecord], out_dir: Path) -> None:
    plot_timelines(records, out_dir / "timelines.png")
    ttfts = [r.chunk_times_s[0] - r.send_s for r in records if r.ok]
    plot_ttft_cdfs({"TTFT": ttfts}, out_dir / "ttft_cdf.png")
    plot_buffers(records, out_dir / "buffers.png")
