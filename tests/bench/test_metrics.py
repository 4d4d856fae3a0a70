"""`tfjax.bench.metrics` on a fixed schedule of sends and token arrivals, against figures
computed by hand from docs/definitions.md (no clock involved: the records are written out).

Request A reads at 2 tok/s, is sent at 0 s and gets one token at 0.5, 1.0 and 2.5 s:
TTFT 0.5 s, ITL 0.5 and 1.5 s, TPOT (2.5 - 0.5) / 2 = 1.0 s, E2EL 2.6 s. Its reader reads token
2 at 1.0 s (due 1.0 s) and waits for token 3 from 1.5 s (due) to 2.5 s: a 1.0 s stall. No token
finds a buffer, so all 3 count as effective.
Request B reads at 1 tok/s, is sent at 1.0 s and gets 1 token at 1.2 s and 2 in one chunk at
1.4 s: TTFT 0.2 s, ITL 0.2 s, TPOT 0.1 s, E2EL 0.5 s. Token 2 is read at 2.2 s, so token 3 finds a
buffer of 1 > 0.1 L = 0.3: weight max(0, 1 - (1 - 0.3) / 0.3) = 0; 2 effective tokens, no stall.
Request C failed (HTTP 429): counted in `failed`, left out of everything else.
Span: first send 0 s to last token 2.5 s, so effective throughput 5 / 2.5 = 2.0 tok/s, raw
6 / 2.5 = 2.4 tok/s; stall ratio 1.0 s over the reading time 3/2 + 3/1 = 4.5 s.
"""

from __future__ import annotations

import pytest

from tfjax.bench.client import RequestRecord, RunTimes
from tfjax.bench.metrics import compute_metrics, request_rows


def _record(index: int, rate: float, send_s: float, chunks: list[tuple[float, int]], end_s: float):
    return RequestRecord(
        index=index,
        rate=rate,
        prompt_len=4,
        max_tokens=3,
        scheduled_s=send_s,
        send_s=send_s,
        end_s=end_s,
        chunk_times_s=[t for t, _ in chunks],
        chunk_tokens=[n for _, n in chunks],
        output_tokens=sum(n for _, n in chunks),
    )


RECORDS = [
    _record(0, 2.0, 0.0, [(0.5, 1), (1.0, 1), (2.5, 1)], end_s=2.6),
    _record(1, 1.0, 1.0, [(1.2, 1), (1.4, 2)], end_s=1.5),
    RequestRecord(
        index=2,
        rate=1.0,
        prompt_len=4,
        max_tokens=3,
        scheduled_s=0.0,
        send_s=0.0,
        end_s=0.1,
        error="HTTP 429: queue full",
    ),  # fmt: skip
]


def test_latencies_under_vllms_names() -> None:
    m = compute_metrics(RECORDS, RunTimes(wall_s=3.0, client_cpu_s=0.3), percentiles=(50, 99))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["errors"] == ["HTTP 429: queue full"]
    assert m["total_output_tokens"] == 6 and m["total_input_tokens"] == 8
    assert m["output_throughput"] == pytest.approx(2.0)  # over the run's wall time
    assert m["request_throughput"] == pytest.approx(2 / 3)
    assert m["client_cpu_per_wall"] == pytest.approx(0.1)
    assert m["mean_ttft_ms"] == pytest.approx(350.0) and m["p50_ttft_ms"] == pytest.approx(350.0)
    assert m["p99_ttft_ms"] == pytest.approx(200 + 0.99 * 300)  # numpy's linear percentile
    assert m["mean_itl_ms"] == pytest.approx((500 + 1500 + 200) / 3)
    assert m["median_itl_ms"] == pytest.approx(500.0)
    assert m["mean_tpot_ms"] == pytest.approx((1000 + 100) / 2)
    assert m["mean_e2el_ms"] == pytest.approx((2600 + 500) / 2)


def test_streaming_figures_from_the_reader_model() -> None:
    m = compute_metrics(RECORDS, RunTimes(wall_s=3.0, client_cpu_s=0.3))
    assert m["effective_tokens"] == pytest.approx(5.0)
    assert m["effective_throughput"] == pytest.approx(2.0)
    assert m["raw_throughput"] == pytest.approx(2.4)
    assert m["stall_ratio"] == pytest.approx(1.0 / 4.5)
    assert m["mean_ttft_s"] == pytest.approx(0.35)
    rows = {r["index"]: r for r in request_rows(RECORDS)}
    assert rows[0]["stall_s"] == pytest.approx(1.0) and rows[1]["stall_s"] == 0.0
    assert (rows[0]["effective_tokens"], rows[1]["effective_tokens"]) == (3.0, 2.0)
    assert rows[1]["ttft_s"] == pytest.approx(0.2) and "ttft_s" not in rows[2]


def test_a_run_without_successes_stays_strict_json() -> None:
    m = compute_metrics(RECORDS[2:], RunTimes(wall_s=1.0, client_cpu_s=0.0))
    assert m["completed"] == 0 and m["mean_ttft_ms"] is None and "effective_throughput" not in m


def test_the_table_shows_every_percentile_asked_for() -> None:
    from tfjax.bench.report import format_table

    m = compute_metrics(RECORDS, RunTimes(wall_s=3.0, client_cpu_s=0.3), percentiles=(50, 99.9))
    table = format_table(m)
    for line in ("P50 TTFT (ms):", "P99.9 ITL (ms):", "P50 E2EL (ms):", "Mean TPOT (ms):"):
        assert line in table
    assert "P99 TTFT" not in table
    assert "Effective throughput (tok/s):" in table and "Failed requests:" in table
