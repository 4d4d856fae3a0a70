"""An `AsyncEngine` frozen in a state computed by hand: a manual clock, a scripted policy and
the fake runner (`tests.fakes`). Shared by the dashboard and /metrics tests, which both check
their numbers against it.

The state at clock 10.0, from the reader model (tfjax/buffers.py: token j is read at
c_j = max(c_{j-1} + 1/r, g_j)):
- A (6-token prompt, r = 2/s, arrived 2.0): running, 5 tokens at 4.0, 4.5, 5.0, 9.0, 9.1,
  nothing unread, buffer 0 s, 3 device pages.
- B (2-token prompt, r = 0.5/s, arrived 8.0): running, tokens at 9.0 and 9.1, one unread,
  buffer 3.0 s, 1 device page.
- C (3-token prompt, r = 4/s, arrived 9.5): admitted (prefilling), no token yet.
Page size 4, 64 pages (63 usable: page 0 is the padding page). The policy plans nothing more,
so the state stays put while a test looks at it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from tests.fakes import FakeRunner, FakeTokenizer
from tfjax.async_engine import AsyncEngine
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.request import Request, SamplingParams
from tfjax.sched.base import Plan, PrefillChunk, SchedulerView


class ManualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ScriptedPolicy:
    """Returns the given plans one per call, then empty plans (the state stays put)."""

    name = "scripted"
    resumes_by_load = False

    def __init__(self, plans: list[Plan]) -> None:
        self.plans = list(plans)

    def plan(self, view: SchedulerView) -> Plan:
        return self.plans.pop(0) if self.plans else Plan()


def request(rid: str, num_prompt: int, arrival_s: float, rate: float) -> Request:
    sampling = SamplingParams(max_tokens=50, ignore_eos=True)
    return Request(rid, list(range(3, 3 + num_prompt)), sampling, arrival_s, rate)


def scripted_async_engine() -> Iterator[AsyncEngine]:
    clock = ManualClock()
    a = request("A", 6, arrival_s=2.0, rate=2.0)
    b = request("B", 2, arrival_s=8.0, rate=0.5)
    c = request("C", 3, arrival_s=9.5, rate=4.0)
    steps = [  # (clock, requests added, plan)
        (4.0, [a], Plan(admit=("A",), prefill=(PrefillChunk(request_id="A", num_tokens=6),))),
        (4.5, [], Plan(decode=("A",))),
        (5.0, [], Plan(decode=("A",))),
        (
            9.0,
            [b],
            Plan(
                admit=("B",), prefill=(PrefillChunk(request_id="B", num_tokens=2),), decode=("A",)
            ),
        ),
        (9.1, [], Plan(decode=("A", "B"))),
    ]
    config = EngineConfig(page_size=4, max_batch_size=8, prefill_token_budget=64)
    policy = ScriptedPolicy([plan for _, _, plan in steps] + [Plan(admit=("C",))])

    def build(emit) -> Engine:
        engine = Engine(
            FakeRunner(num_pages=64, page_size=4),
            FakeTokenizer(),
            config,
            policy,
            emit=emit,
            clock=clock,
        )
        for t, new, _ in steps:
            clock.t = t
            for r in new:
                engine.add_request(r)
            assert engine.step()
        clock.t = 9.8  # the admission of C, planned by the engine thread
        engine.add_request(c)
        return engine

    served = AsyncEngine(build, model_name="fake-model", tokenizer=None, max_waiting=10)
    deadline = time.monotonic() + 10
    while served.engine.last_decision.admit != ("C",):
        assert time.monotonic() < deadline, "the engine thread never planned"
        time.sleep(0.001)
    clock.t = 10.0
    yield served
    served.shutdown()
