"""docs/grafana/tfjax.json queries only series that /metrics really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serving.prom import Metrics
from tests.serving.fake_engine import STATS

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "tfjax.json"


def test_every_queried_series_is_exported() -> None:
    metrics = Metrics("fake")
    metrics.ttft.observe(0.1)
    metrics.itl.observe(0.1)
    metrics.finished.labels("stop").inc()
    metrics.http_requests.labels("/health", "200").inc()
    exported = set(re.findall(r"^(tfjax_\w+)", metrics.render(STATS, None).decode(), re.MULTILINE))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"tfjax_\w+", expr)}
    assert len(dashboard["panels"]) >= 9 and queried
    assert queried <= exported, sorted(queried - exported)
    for needed in ("time_to_first_token", "inter_token", "effective_tokens", "kv_pages",
                   "preemptions", "offload_bytes"):  # fmt: skip
        assert any(needed in name for name in queried), needed
