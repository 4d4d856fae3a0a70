"""Builds what the live dashboard shows of the engine: one `tfjax.api.LiveState` per refresh.

`build_live_state` runs on the engine thread between two steps (posted by
`AsyncEngine.live_state`, only while someone looks), so reading the requests needs no lock and
a step never pays for it. The snapshot is made of frozen values and is handed to the event loop
as is. Statuses are `RequestStatus.value` strings, so a new status needs no change here.
"""

from __future__ import annotations

from collections.abc import Callable

from tfjax.api import Decision, EngineStats, LiveState, RequestState
from tfjax.kv.pages import pages_needed
from tfjax.request import Request


def build_live_state(
    requests: dict[str, Request],
    *,
    now_s: float,
    policy: str,
    stats: EngineStats,
    last_decision: Decision | None,
    page_size: int,
    host_synced_tokens: Callable[[str], int] | None,
) -> LiveState:
    """The snapshot of `requests` at `now_s` (call on the engine thread)."""
    rows = []
    for r in requests.values():
        reader = r.reader
        synced = host_synced_tokens(r.request_id) if host_synced_tokens else 0
        rows.append(
            RequestState(
                r.request_id,
                r.status.value,
                r.priority,
                now_s - r.arrival_s,
                reader.rate,
                reader.buffer_tokens(now_s),
                reader.buffer_s(now_s),
                None if reader.first_token_s is None else reader.first_token_s - r.arrival_s,
                r.num_output_tokens,
                r.sampling.max_tokens,
                reader.stall_until_s(now_s),
                r.num_preemptions,
                len(r.page_ids),
                pages_needed(synced, page_size),
            )
        )
    return LiveState(now_s, policy, stats, last_decision, tuple(rows))
