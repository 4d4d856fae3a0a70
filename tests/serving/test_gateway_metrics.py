"""The gateway contract of /metrics: vLLM-named series with vLLM's types and meaning, and the
buffer-aware series, checked against the `tfjax_*` series of the same scrape, the dashboard
state and a hand-computed engine state, and under a burst on a live server; and `/get_load`,
which routers poll."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.app import create_app
from serving.gateway_metrics import vllm_families
from tests.reliability.harness import (
    PacedRunner,
    TextTokenizer,
    completion_body,
    expected_text,
    make_engine,
    serve,
    stream_request,
)
from tfjax.api import EngineStats
from tfjax.async_engine import AsyncEngine

pytestmark = pytest.mark.anyio

VLLM_TYPES = {  # family name (counters without `_total`, as the parser gives them) -> type
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
}
Samples = dict[str, dict[tuple, float]]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """({family name: type}, {sample name: {sorted label items: value}})."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return types, samples


def one(samples: Samples, name: str, model: str = "fake") -> float:
    """The value of a vLLM series of one engine, which carries vLLM's labels."""
    return samples[name][(("engine", "0"), ("model_name", model))]


def check_contract(text: str) -> Samples:
    """Every vLLM series is there with its type and agrees with the tfjax series beside it."""
    types, m = parse(text)
    assert {name: types.get(name) for name in VLLM_TYPES} == VLLM_TYPES
    assert one(m, "vllm:num_requests_running") == m["tfjax_num_requests_running"][()]
    assert one(m, "vllm:num_requests_waiting") == (
        m["tfjax_num_requests_waiting"][()] + m["tfjax_num_requests_preempted"][()]
    )
    used = m["tfjax_kv_pages_used"][(("tier", "device"),)]
    total = m["tfjax_kv_pages_total"][(("tier", "device"),)]
    usage = one(m, "vllm:kv_cache_usage_perc")
    assert usage == pytest.approx(used / total) and 0.0 <= usage <= 1.0
    assert one(m, "vllm:gpu_cache_usage_perc") == usage
    ((labels, value),) = m["vllm:cache_config_info"].items()
    assert value == 1 and dict(labels)["num_gpu_blocks"] == str(int(total))
    hits = m["tfjax_prefix_cache_hit_tokens_total"].get((("tier", "device"),), 0.0)
    assert one(m, "vllm:prefix_cache_hits_total") == hits
    assert one(m, "vllm:prefix_cache_hits_total") <= one(m, "vllm:prefix_cache_queries_total")
    return m


async def test_series_match_the_hand_computed_state_and_the_dashboard(
    async_engine: AsyncEngine,
) -> None:
    app = create_app(async_engine, served_model_name="fake")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        metrics = (await c.get("/metrics")).text
        dashboard = (await c.get("/dashboard/state")).json()["engine"]
        load = (await c.get("/get_load")).json()
    m = check_contract(metrics)
    # A and B running, C prefilling (scripted_engine's docstring): 4 of 63 usable pages.
    assert one(m, "vllm:num_requests_running") == 3 == dashboard["num_running"]
    assert one(m, "vllm:num_requests_waiting") == 0 == dashboard["queue_length"]
    assert load == {"load": 3}  # what the routers' power-of-two policy polls
    assert one(m, "vllm:kv_cache_usage_perc") == pytest.approx(4 / 63)
    assert dashboard["device_pages_used"] == 4 and dashboard["device_pages_total"] == 63
    labels = {(("block_size", "4"), ("engine", "0"), ("num_gpu_blocks", "63")): 1.0}
    assert m["vllm:cache_config_info"] == labels
    # Slack: A has read everything (0 s), B has 3.0 s left, C has no token yet (not counted).
    assert m["tfjax_buffer_slack_seconds"][()] == pytest.approx(3.0)
    assert m["tfjax_num_streams_paused"][()] == 0


def test_prefix_counters_count_tokens_and_only_device_hits() -> None:
    stats = EngineStats(
        prefix_cache_queries=3,  # lookups
        prefix_cache_query_tokens=96,
        prefix_cache_hit_tokens={"device": 32, "host": 16},
        device_pages_total=10,
        device_pages_used=4,
        page_size=16,
        num_waiting=2,
        num_preempted=1,
        num_running=5,
    )
    families = {f.name: f for f in vllm_families(stats, "m")}
    value = {name: f.samples[0].value for name, f in families.items()}
    assert value["vllm:prefix_cache_queries"] == 96 and value["vllm:prefix_cache_hits"] == 32
    assert value["vllm:num_requests_waiting"] == 3  # preempted requests wait, as in vLLM
    assert value["vllm:num_requests_running"] == 5
    assert value["vllm:kv_cache_usage_perc"] == 0.4
    assert families["vllm:cache_config_info"].samples[0].labels == {
        "block_size": "16",
        "num_gpu_blocks": "10",
        "engine": "0",
    }


async def test_contract_holds_in_every_scrape_under_a_burst() -> None:
    """16 streams on a pool of 40 pages (a stream needs up to 10): requests wait and are
    preempted; every scrape taken meanwhile keeps the contract, and the burst's output is
    exact."""
    runner = PacedRunner(step_s=0.003, num_pages=1024, page_size=4)
    engine = make_engine(runner, num_pages=40, max_batch_size=8, prefill_token_budget=32)
    tokenizer = TextTokenizer()
    prompts = [f"burst {i:02d}" for i in range(16)]
    with serve(engine) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            burst = asyncio.gather(
                *(stream_request(client, completion_body(p, 30)) for p in prompts)
            )
            scrapes = []
            while not burst.done() and len(scrapes) < 500:
                scrapes.append(check_contract((await client.get("/metrics")).text))
                await asyncio.sleep(0.01)
            results = await burst
            idle = check_contract((await client.get("/metrics")).text)
    assert [r.text for r in results] == [expected_text(tokenizer, p, 30) for p in prompts]
    assert max(one(m, "vllm:num_requests_running") for m in scrapes) > 0
    assert max(one(m, "vllm:num_requests_waiting") for m in scrapes) > 0
    assert max(m["tfjax_buffer_slack_seconds"][()] for m in scrapes) > 0
    paused = [
        (m["tfjax_num_streams_paused"][()], m["tfjax_num_requests_preempted"][()]) for m in scrapes
    ]
    assert max(p for p, _ in paused) > 0
    assert all(p >= preempted for p, preempted in paused)  # loading streams are paused too
    assert one(idle, "vllm:num_requests_running") == one(idle, "vllm:num_requests_waiting") == 0
    assert one(idle, "vllm:kv_cache_usage_perc") == 0 and idle["tfjax_num_streams_paused"][()] == 0
    # The prompts share their first page ("burs"): later lookups hit it, counted in tokens.
    assert one(idle, "vllm:prefix_cache_hits_total") % 4 == 0
    assert (
        0 < one(idle, "vllm:prefix_cache_hits_total") < one(idle, "vllm:prefix_cache_queries_total")
    )
