"""`GET /dashboard/state` against an engine state built step by step with a manual clock and a
scripted policy on the fake runner, so every number below can be checked by hand from the
reader model (tfjax/buffers.py): token j is read at c_j = max(c_{j-1} + 1/r, g_j)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from serving.app import create_app
from serving.dashboard import Dashboard
from tests.fakes import FakeRunner, FakeTokenizer
from tests.serving.scripted_engine import ManualClock, ScriptedPolicy, request
from tfjax.api import EngineStats, LiveState
from tfjax.async_engine import LIVE_STATE_WAIT_S, AsyncEngine
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.live_state import build_live_state
from tfjax.sched.base import Plan, PrefillChunk

pytestmark = pytest.mark.anyio


async def test_state_matches_the_hand_computed_reader_model(async_engine: AsyncEngine) -> None:
    app = create_app(async_engine, served_model_name="fake")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/dashboard/state")
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["now_s"] == 10.0
    rows = {row["id"]: row for row in state["requests"]}
    assert list(rows) == ["A", "B", "C"]  # arrival order
    # A (r = 2/s): tokens at 4.0, 4.5, 5.0, 9.0, 9.1 are read at 4.0, 4.5, 5.0, 9.0 (due at
    # 5.5: stall 3.5 s), 9.5. At 10.0 nothing is unread and the reader is due at 10.0.
    assert rows["A"] == pytest.approx(
        dict(
            id="A", status="running", priority=0, age_s=8.0, consumption_rate=2.0,
            buffer_tokens=0, buffer_s=0.0, ttft_s=2.0, tokens_generated=5, max_tokens=50,
            stall_s=3.5, preemptions=0, device_pages=3, host_pages=0,
        )
    )  # fmt: skip
    # B (r = 0.5/s): tokens at 9.0 and 9.1 are read at 9.0 and 11.0: one unread at 10.0, and
    # the reader wants a third token at 13.0.
    assert rows["B"] == pytest.approx(
        dict(
            id="B", status="running", priority=0, age_s=2.0, consumption_rate=0.5,
            buffer_tokens=1, buffer_s=3.0, ttft_s=1.0, tokens_generated=2, max_tokens=50,
            stall_s=0.0, preemptions=0, device_pages=1, host_pages=0,
        )
    )  # fmt: skip
    assert rows["C"]["status"] == "prefilling" and rows["C"]["ttft_s"] is None
    assert rows["C"]["age_s"] == pytest.approx(0.5) and rows["C"]["tokens_generated"] == 0
    engine = state["engine"]
    assert engine["policy"] == "scripted" and engine["model"] == "fake-model"
    assert engine["device_pages_used"] == 4 and engine["queue_length"] == 0
    assert engine["num_running"] == 3 and engine["host_pages_total"] == 0
    decision = engine["last_decision"]
    assert decision.pop("age_s") == pytest.approx(0.2)
    assert decision == {"preempt": [], "resume": [], "admit": ["C"]}
    assert engine["decode_tok_s"] is None  # one sample: no rate yet


def test_rates_are_counter_differences_over_the_window() -> None:
    dashboard = Dashboard(engine=None)  # to_json reads the engine only for model and health

    def state(now: float, generated: int, effective: float, steps: int, copy_s: float):
        stats = EngineStats(
            num_generated_tokens=generated,
            effective_tokens=effective,
            num_steps=steps,
            host_copy_s=copy_s,
        )
        return LiveState(now, "p", stats, None, ())

    assert dashboard._rates(state(100.0, 0, 0.0, 0, 0.0)) == (None, None, None)
    assert dashboard._rates(state(102.0, 40, 10.0, 4, 0.002)) == pytest.approx((20.0, 5.0, 0.5))
    assert dashboard._rates(state(104.0, 100, 10.0, 10, 0.002)) == pytest.approx((25.0, 2.5, 0.2))
    # 115: the samples at 100 and 102 are older than 10 s; 104 stays as the window's start.
    assert dashboard._rates(state(115.0, 320, 65.0, 10, 0.003)) == (20.0, 5.0, None)


def test_host_pages_round_up_and_statuses_are_generic() -> None:
    r = request("X", 5, arrival_s=0.0, rate=1.0)
    r.page_ids = [7, 8]
    state = build_live_state(
        {"X": r},
        now_s=1.0,
        policy="p",
        stats=EngineStats(),
        last_decision=None,
        page_size=4,
        host_synced_tokens=lambda rid: {"X": 5}[rid],
    )
    (row,) = state.requests
    assert (row.device_pages, row.host_pages) == (2, 2)  # 5 synced tokens: 2 pages of 4
    assert row.status == r.status.value == "waiting"


def test_engine_keeps_the_last_plan_that_moved_a_request() -> None:
    a, b = request("a", 3, arrival_s=0.0, rate=4.0), request("b", 3, arrival_s=0.0, rate=4.0)
    plans = [
        Plan(admit=("a",), prefill=(PrefillChunk(request_id="a", num_tokens=3),)),
        Plan(decode=("a",)),
        Plan(preempt=("a",), admit=("b",), prefill=(PrefillChunk(request_id="b", num_tokens=3),)),
    ]
    clock = ManualClock()
    engine = Engine(
        FakeRunner(num_pages=16, page_size=4),
        FakeTokenizer(),
        EngineConfig(page_size=4),
        ScriptedPolicy(plans),
        emit=None,
        clock=clock,
    )
    engine.add_request(a)
    engine.add_request(b)
    clock.t = 1.0
    assert engine.step()
    assert engine.last_decision.admit == ("a",) and engine.last_decision.at_s == 1.0
    clock.t = 2.0
    assert engine.step()  # decode only: not a decision
    assert engine.last_decision.at_s == 1.0
    assert engine.step()
    last = engine.last_decision
    assert (last.preempt, last.admit, last.at_s) == (("a",), ("b",), 2.0)


async def test_dashboard_page_is_served_from_the_package(client: httpx.AsyncClient) -> None:
    r = await client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/dashboard/state" in r.text and "data-request-id" not in r.text.split("<script>")[0]
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: the machines have no net
    r = await client.get("/dashboard/state")  # the fake engine has no live state
    assert r.status_code == 503


async def test_live_state_does_not_wait_for_a_long_step() -> None:
    """While the engine thread is busy, a refresh returns the newest snapshot after at most
    `LIVE_STATE_WAIT_S` instead of waiting for the step."""
    release = threading.Event()
    clock = ManualClock()
    served = AsyncEngine(
        lambda emit: Engine(
            FakeRunner(num_pages=8, page_size=4),
            FakeTokenizer(),
            EngineConfig(page_size=4),
            ScriptedPolicy([]),
            emit=emit,
            clock=clock,
        ),
        model_name="m",
        tokenizer=None,
        max_waiting=1,
    )
    try:
        first = await served.live_state()
        assert first is not None and first.requests == ()
        served._post(lambda: release.wait(10))  # the engine thread is busy for up to 10 s
        start = time.monotonic()
        again = await served.live_state()
        assert again is first and time.monotonic() - start < LIVE_STATE_WAIT_S + 1.0
        release.set()
        await asyncio.sleep(0.05)
        assert (await served.live_state()) is not first
    finally:
        release.set()
        served.shutdown()
