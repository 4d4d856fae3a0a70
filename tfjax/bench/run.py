"""One serving run against a base URL: scrape the server's counters, send every request on its
schedule, scrape again, and compute the result. `tfjax bench serve` makes one such run;
`tfjax bench compare` makes one per server and repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from tfjax.bench.client import ClientConfig, RequestRecord, run_requests
from tfjax.bench.metrics import compute_metrics, request_rows
from tfjax.bench.scrape import counter_figures, scrape_counters
from tfjax.bench.workload import ClientRequest


async def benchmark(
    cfg: ClientConfig,
    requests: Sequence[ClientRequest],
    *,
    percentiles: Sequence[float] = (99,),
    progress: bool = True,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """One run: scrape /metrics, send everything, scrape again; returns (result, records)."""
    before = await scrape_counters(cfg.base_url)
    records, times = await run_requests(cfg, requests, progress=progress)
    after = await scrape_counters(cfg.base_url)
    result = compute_metrics(records, times, percentiles=percentiles)
    result |= counter_figures(before, after)
    result["config"] = asdict(cfg)
    result["requests"] = request_rows(records)
    return result, records
