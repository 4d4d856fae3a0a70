"""Prometheus metrics of one app: engine gauges and counters, plus what the HTTP layer observes.

Each `Metrics` owns its own `CollectorRegistry` (never the process-global one), so several apps
can live in one process, as they do in the tests. Two kinds of series:

- Engine state (`engine_families`): rendered from one snapshot per scrape (the engine's
  `LiveState` when it has one, so /metrics agrees with /dashboard/state; else
  `EngineClient.stats()`), so they cost nothing between scrapes and are at most one engine step
  old. Counters the engine keeps (preemptions, offload bytes, tokens, compiles after warm-up)
  are exposed as counters. The same snapshot gives the series routers read under vLLM's names
  and the buffer-aware ones (`serving.gateway_metrics`).
- Latencies and request counts: observed by the app as deltas arrive. TTFT runs from submit to
  the first delta carrying tokens; inter-token latency is the gap between consecutive deltas
  carrying tokens, i.e. per SSE chunk, which is what a client measures. `StatusCounter` counts
  every HTTP answer by endpoint and status code (a streamed request counts as its initial 200).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.gateway_metrics import buffer_families, vllm_families
from tfjax.api import EngineStats, LiveState

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
ENDPOINTS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/get_load",
    "/dashboard",
    "/dashboard/state",
)  # any other path is counted as "other", so random URLs cannot grow the label set

# Under preemptive scheduling a first token or a token gap can legitimately take seconds.
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
_ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2, 4, 8, 16)


def engine_families(s: EngineStats) -> Iterator[Metric]:
    """The `tfjax_*` series of one `EngineStats` snapshot."""
    for name, doc, value in (
        ("tfjax_num_requests_waiting", "Requests waiting for admission.", s.num_waiting),
        ("tfjax_num_requests_running", "Requests resident on the device.", s.num_running),
        ("tfjax_num_requests_preempted", "Requests preempted, waiting to resume.",
         s.num_preempted),
        ("tfjax_compiled_buckets", "Step buckets and page-copy sizes compiled; fewer than "
         "tfjax_buckets: the rest compile in the background, steps run padded or split.",
         s.num_compiled_buckets),
        ("tfjax_buckets", "Step buckets and page-copy sizes the runner compiles in all.",
         s.num_buckets),
    ):  # fmt: skip
        yield GaugeMetricFamily(name, doc, value=value)
    used = GaugeMetricFamily("tfjax_kv_pages_used", "KV pages in use.", labels=["tier"])
    total = GaugeMetricFamily("tfjax_kv_pages_total", "KV pages in the pool.", labels=["tier"])
    used.add_metric(["device"], s.device_pages_used)
    used.add_metric(["host"], s.host_pages_used)
    total.add_metric(["device"], s.device_pages_total)
    total.add_metric(["host"], s.host_pages_total)
    yield used
    yield total
    offload = CounterMetricFamily(
        "tfjax_offload_bytes", "KV bytes copied between tiers.", labels=["direction"]
    )
    offload.add_metric(["d2h"], s.offload_bytes_d2h)
    offload.add_metric(["h2d"], s.offload_bytes_h2d)
    yield offload
    hits = CounterMetricFamily(
        "tfjax_prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache.",
        labels=["tier"],
    )  # fmt: skip
    for tier, value in sorted(s.prefix_cache_hit_tokens.items()):
        hits.add_metric([tier], value)
    yield hits
    for name, doc, value in (
        ("tfjax_preemptions", "Preemptions of running requests.", s.num_preemptions),
        ("tfjax_prefix_cache_queries", "Prefix cache lookups (one per prefill from scratch).",
         s.prefix_cache_queries),
        ("tfjax_compiles_after_warmup", "XLA compiles after warm-up (each one is a bug).",
         s.num_compiles_after_warmup),
        ("tfjax_generated_tokens", "Output tokens generated.", s.num_generated_tokens),
        ("tfjax_engine_steps", "Engine steps that ran.", s.num_steps),
        ("tfjax_host_copy_seconds", "Link seconds of KV copies to the host (measured "
         "bandwidth); per step: its rate over tfjax_engine_steps'.", s.host_copy_s),
        ("tfjax_effective_tokens", "Output tokens weighted by the effective-throughput rule.",
         s.effective_tokens),
    ):  # fmt: skip
        yield CounterMetricFamily(name, doc, value=value)
    if s.extra:
        extra = GaugeMetricFamily("tfjax_engine_extra", "Other engine figures.", labels=["name"])
        for key, value in sorted(s.extra.items()):
            extra.add_metric([key], value)
        yield extra


class _Snapshot:
    """The engine's series of one scrape, in the shape `generate_latest` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


class Metrics:
    """The registry of one app and the series the app observes itself."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "tfjax_time_to_first_token_seconds",
            "Submit to the first delta carrying tokens.",
            buckets=_TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.itl = Histogram(
            "tfjax_inter_token_latency_seconds",
            "Gap between consecutive deltas carrying tokens.",
            buckets=_ITL_BUCKETS_S,
            registry=self.registry,
        )
        self.finished = Counter(
            "tfjax_requests_finished",
            "Generation requests ended, by finish reason (abort: client gone or shutdown).",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "tfjax_http_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )

    def render(self, stats: EngineStats, state: LiveState | None) -> bytes:
        """The exposition text: the engine series of `stats` (and, given the `state` they were
        taken with, the buffer-aware ones), then the app's own."""
        families = [*engine_families(stats), *vllm_families(stats, self.model_name)]
        if state is not None:
            families += buffer_families(state)
        return generate_latest(_Snapshot(families)) + generate_latest(self.registry)


class StatusCounter:
    """ASGI middleware counting each HTTP answer in `Metrics.http_requests`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # Starlette's outermost middleware answers it with a 500
                self.metrics.http_requests.labels(endpoint, "500").inc()
            raise
