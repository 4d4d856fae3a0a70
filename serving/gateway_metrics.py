"""The series a router in front of several replicas reads from each replica's /metrics.

Routers that balance LLM replicas scrape a few gauges under vLLM's names, so a tfjax replica
exports them with vLLM's types, units and meaning (vLLM `vllm/v1/metrics/loggers.py`), next to
the `tfjax_*` series and computed from the same `EngineStats` snapshot:

- `vllm:num_requests_running` (gauge): requests in the running batch, prefilling included
  (`tfjax_num_requests_running`).
- `vllm:num_requests_waiting` (gauge): requests waiting to be processed. vLLM puts a preempted
  request back in its waiting queue, so this is `tfjax_num_requests_waiting` plus
  `tfjax_num_requests_preempted`.
- `vllm:kv_cache_usage_perc` and its older name `vllm:gpu_cache_usage_perc` (gauges): the used
  fraction of the device KV pool, 0 to 1 despite the name; cached pages no request holds count
  as free, as vLLM counts evictable blocks.
- `vllm:cache_config_info` (gauge, always 1): labels `block_size` (tokens per page) and
  `num_gpu_blocks` (usable device pages); llm-d's endpoint picker reads the block size from it.
- `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (counters, in tokens):
  prompt tokens looked up in the prefix cache, and those served from cached device pages
  (host-tier hits are not local hits: they are in `tfjax_prefix_cache_hit_tokens_total`).

Every vLLM series carries vLLM's `model_name` and `engine` labels (one engine: "0").

Buffer-aware series, which no other engine exports, need the per-request reader model, so they
come from a `LiveState` snapshot and are left out when the engine has none:
- `tfjax_buffer_slack_seconds` (gauge): summed over streams that have their first token and are
  on the device, how long each reader can go on reading what is already generated. A router
  can add load to a replica with much slack without making any reader stall.
- `tfjax_num_streams_paused` (gauge): requests off the device (preempted, or loading their KV
  back), whose readers live on their buffers meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from tfjax.api import EngineStats, LiveState
from tfjax.request import RequestStatus

ENGINE_INDEX = "0"  # vLLM labels each engine core of a data-parallel server; tfjax has one
_ON_DEVICE = (RequestStatus.RUNNING.value, RequestStatus.PREFILLING.value)
_PAUSED = (RequestStatus.PREEMPTED.value, RequestStatus.LOADING.value)


def vllm_families(stats: EngineStats, model_name: str) -> Iterator[Metric]:
    """The vLLM-named series of one `EngineStats` snapshot."""
    labels = ["model_name", "engine"]
    values = [model_name, ENGINE_INDEX]

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=labels)
        family.add_metric(values, value)
        return family

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=labels)
        family.add_metric(values, value)
        return family

    yield gauge(
        "vllm:num_requests_running", "Number of requests in model execution batches.",
        stats.num_running,
    )  # fmt: skip
    yield gauge(
        "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
        stats.num_waiting + stats.num_preempted,
    )  # fmt: skip
    usage = kv_cache_usage(stats)
    yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage)
    yield gauge(
        "vllm:gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage. Old name of vllm:kv_cache_usage_perc.",
        usage,
    )
    info = GaugeMetricFamily(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        labels=["block_size", "num_gpu_blocks", "engine"],
    )
    info.add_metric([str(stats.page_size), str(stats.device_pages_total), ENGINE_INDEX], 1)
    yield info
    yield counter(
        "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
        stats.prefix_cache_query_tokens,
    )  # fmt: skip
    yield counter(
        "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
        stats.prefix_cache_hit_tokens.get("device", 0),
    )  # fmt: skip


def kv_cache_usage(stats: EngineStats) -> float:
    """Used fraction of the device KV pool (0 while the pool size is unknown)."""
    if stats.device_pages_total <= 0:
        return 0.0
    return stats.device_pages_used / stats.device_pages_total


def buffer_families(state: LiveState) -> Iterator[Metric]:
    """The buffer-aware series of one `LiveState` snapshot."""
    slack_s = sum(
        r.buffer_s for r in state.requests if r.status in _ON_DEVICE and r.ttft_s is not None
    )
    yield GaugeMetricFamily(
        "tfjax_buffer_slack_seconds",
        "Sum over streams on the device with a first token of the seconds their readers can "
        "read before they want a token not yet generated.",
        value=slack_s,
    )
    yield GaugeMetricFamily(
        "tfjax_num_streams_paused",
        "Requests off the device (preempted or loading their KV back) living on their buffers.",
        value=sum(1 for r in state.requests if r.status in _PAUSED),
    )
