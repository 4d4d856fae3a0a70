"""/metrics: Prometheus text that parses, engine series read at scrape time, app histograms."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from tests.serving.fake_engine import STATS, FakeEngine

pytestmark = pytest.mark.anyio


async def scrape(client: httpx.AsyncClient) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


async def test_engine_series(client: httpx.AsyncClient) -> None:
    m = await scrape(client)
    assert m["tfjax_num_requests_waiting"][()] == STATS.num_waiting
    assert m["tfjax_num_requests_running"][()] == STATS.num_running
    assert m["tfjax_num_requests_preempted"][()] == STATS.num_preempted
    assert m["tfjax_kv_pages_used"] == {(("tier", "device"),): 40, (("tier", "host"),): 7}
    assert m["tfjax_kv_pages_total"] == {(("tier", "device"),): 100, (("tier", "host"),): 400}
    assert m["tfjax_offload_bytes_total"] == {
        (("direction", "d2h"),): 4096,
        (("direction", "h2d"),): 1024,
    }
    assert m["tfjax_preemptions_total"][()] == 11
    assert m["tfjax_compiles_after_warmup_total"][()] == 0
    assert m["tfjax_compiled_buckets"][()] == 10 and m["tfjax_buckets"][()] == 26
    assert m["tfjax_generated_tokens_total"][()] == 1234
    assert m["tfjax_effective_tokens_total"][()] == 1000.5
    assert m["tfjax_engine_extra"][(("name", "mean_stall_s"),)] == 0.25


async def test_app_series(client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True})
    await client.post("/v1/completions", json={"prompt": "hi", "n": 999})
    await client.get("/nowhere")
    m = await scrape(client)
    assert m["tfjax_time_to_first_token_seconds_count"][()] == 1
    assert m["tfjax_inter_token_latency_seconds_count"][()] == 3
    assert m["tfjax_requests_finished_total"][(("finish_reason", "length"),)] == 1
    http = m["tfjax_http_requests_total"]
    assert http[(("endpoint", "/v1/completions"), ("status", "200"))] == 1
    assert http[(("endpoint", "/v1/completions"), ("status", "400"))] == 1
    assert http[(("endpoint", "other"), ("status", "404"))] == 1


async def test_registries_are_per_app() -> None:
    """Two apps in one process: no duplicate-registration error, no shared counts."""
    first, second = create_app(FakeEngine()), create_app(FakeEngine())
    for app in (first, second):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            m = await scrape(client)
            assert m["tfjax_requests_finished_total"][(("finish_reason", "length"),)] == 1
