"""The server's Prometheus counters before and after a run, so a result can say what grew.

Counters of any server are kept (`name{labels}` -> value); `preemptions` reads the counter of
a server we know (ours, vLLM's). A server without `/metrics` gives None, never an error.
"""

from __future__ import annotations

from typing import Any

import httpx

# Preemption counters of the servers we know: ours, and vLLM's.
PREEMPTION_COUNTERS = ("tfjax_preemptions_total", "vllm:num_preemptions_total")


async def scrape_counters(base_url: str) -> dict[str, float] | None:
    """Every counter sample of the server's /metrics (`name{labels}` -> value), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.get(base_url + "/metrics")
        if resp.status_code != 200:
            return None
        counters = {}
        for family in text_string_to_metric_families(resp.text):
            if family.type not in ("counter", "unknown"):  # unknown: not matched to a TYPE
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                    counters[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return counters
    except (httpx.HTTPError, OSError, ValueError):
        return None


def counter_delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}


def counter_figures(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, Any]:
    """`server_counters_delta` and `preemptions` (None where the server does not tell)."""
    delta = counter_delta(before, after)
    known = [name for name in PREEMPTION_COUNTERS if after and name in after]
    preemptions = int(delta.get(known[0], 0)) if delta is not None and known else None
    return {"server_counters_delta": delta, "preemptions": preemptions}
