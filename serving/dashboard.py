"""The live dashboard: `GET /dashboard` (one HTML page, shipped in the package) and
`GET /dashboard/state` (the JSON it draws, about twice a second).

The state comes from `AsyncEngine.live_state()`, a snapshot the engine thread builds between
two steps only when a page asks, so an idle dashboard costs nothing and an open one costs one
pass over the live requests per refresh. Decode and effective tokens/s are differences of the
engine's counters between snapshots of the last `RATE_WINDOW_S` seconds, and so are the host
copy milliseconds per step (what write-through and swaps cost the link); effective tokens are
credited when a request finishes (their weights need its final length), so that rate lags.

JSON shape (times in seconds, rates in tokens/s; `null` where there is nothing to say yet):

    {"now_s", "engine": {"model", "policy", "healthy", "device_pages_used", "device_pages_total",
      "host_pages_used", "host_pages_total", "queue_length", "num_running", "num_preempted",
      "num_preemptions", "compiled_buckets", "buckets", "decode_tok_s", "effective_tok_s",
      "host_copy_ms_per_step", "rate_window_s",
      "last_decision": {"age_s", "preempt", "resume", "admit"} | null},
     "requests": [{"id", "status", "priority", "age_s", "consumption_rate", "buffer_tokens",
      "buffer_s", "ttft_s", "tokens_generated", "max_tokens", "stall_s", "preemptions",
      "device_pages", "host_pages"}, ...]}
"""

from __future__ import annotations

from collections import deque
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from tfjax.api import EngineClient, LiveState, LiveStateSource

RATE_WINDOW_S = 10.0
_PAGE = resources.files("serving").joinpath("static/dashboard.html")


class Dashboard:
    """The two routes, and the counter samples behind the rates."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        # (now, generated, effective, steps, host copy s)
        self._samples: deque[tuple[float, int, float, int, float]] = deque()
        self._page = _PAGE.read_bytes()

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self._page, headers={"Cache-Control": "no-cache"})

    async def state(self, request: Request) -> Response:
        source = self.engine
        state = await source.live_state() if isinstance(source, LiveStateSource) else None
        if state is None:
            return JSONResponse({"error": "the engine has no live state yet"}, status_code=503)
        return JSONResponse(self.to_json(state), headers={"Cache-Control": "no-store"})

    def to_json(self, state: LiveState) -> dict[str, Any]:
        decode, effective, copy_ms = self._rates(state)
        s = state.stats
        decision = state.last_decision
        return {
            "now_s": state.now_s,
            "engine": {
                "model": self.engine.model_name,
                "policy": state.policy,
                "healthy": self.engine.is_healthy,
                "device_pages_used": s.device_pages_used,
                "device_pages_total": s.device_pages_total,
                "host_pages_used": s.host_pages_used,
                "host_pages_total": s.host_pages_total,
                "queue_length": s.num_waiting,
                "num_running": s.num_running,
                "num_preempted": s.num_preempted,
                "num_preemptions": s.num_preemptions,
                "compiled_buckets": s.num_compiled_buckets,
                "buckets": s.num_buckets,
                "decode_tok_s": decode,
                "effective_tok_s": effective,
                "host_copy_ms_per_step": copy_ms,
                "rate_window_s": RATE_WINDOW_S,
                "last_decision": None
                if decision is None
                else {
                    "age_s": state.now_s - decision.at_s,
                    "preempt": list(decision.preempt),
                    "resume": list(decision.resume),
                    "admit": list(decision.admit),
                },
            },
            "requests": [r._asdict() for r in state.requests],
        }

    def _rates(self, state: LiveState) -> tuple[float | None, float | None, float | None]:
        """Tokens/s generated and effective, and host copy ms per step, over the samples of
        the last `RATE_WINDOW_S` (None where the window holds no time, or no step)."""
        now, s = state.now_s, state.stats
        samples = self._samples
        if not samples or now > samples[-1][0]:
            samples.append(
                (now, s.num_generated_tokens, s.effective_tokens, s.num_steps, s.host_copy_s)
            )
        while len(samples) > 2 and samples[1][0] <= now - RATE_WINDOW_S:
            samples.popleft()
        (t0, gen0, eff0, steps0, copy0), (t1, gen1, eff1, steps1, copy1) = samples[0], samples[-1]
        copy_ms = 1e3 * (copy1 - copy0) / (steps1 - steps0) if steps1 > steps0 else None
        if t1 <= t0:
            return None, None, copy_ms
        return (gen1 - gen0) / (t1 - t0), (eff1 - eff0) / (t1 - t0), copy_ms
