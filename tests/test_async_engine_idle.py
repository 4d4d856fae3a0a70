"""`AsyncEngine.idle_for`: how long the engine thread has run no step, which the background
compiles wait on before they take the CPU (tfjax/executables.py)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence

import numpy as np

from tests.fakes import FakeRunner, FakeTokenizer
from tfjax.async_engine import AsyncEngine
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.manager import PrefillWork
from tfjax.request import Request, SamplingParams
from tfjax.sched.fcfs import FcfsPolicy

WAIT_S = 10.0


class GatedRunner(FakeRunner):
    """A fake runner whose first step waits for `gate`, so a test can look during it."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__(num_pages=64)
        self.gate = gate
        self.stepping = threading.Event()

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> np.ndarray:
        self.stepping.set()
        assert self.gate.wait(WAIT_S)
        return super().step(prefill, decode)


def test_idle_for_is_zero_while_a_step_runs_and_grows_after_the_last() -> None:
    gate = threading.Event()
    runner = GatedRunner(gate)
    config = EngineConfig(page_size=4, max_batch_size=4, prefill_token_budget=16)
    engine = AsyncEngine(
        lambda emit: Engine(runner, FakeTokenizer(), config, FcfsPolicy(chunked=True), emit=emit),
        model_name="fake",
        tokenizer=FakeTokenizer(),
        max_waiting=8,
    )

    async def run() -> None:
        assert engine.idle_for() == math.inf  # no step yet
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=2))
        assert await asyncio.to_thread(runner.stepping.wait, WAIT_S)
        assert engine.idle_for() == 0.0
        gate.set()
        async for _ in stream:
            pass

    try:
        asyncio.run(run())
        deadline = time.monotonic() + WAIT_S
        while not 0 < (after_last := engine.idle_for()) < math.inf:
            assert time.monotonic() < deadline, "the engine thread did not finish its step"
            time.sleep(0.01)
        time.sleep(0.05)
        assert engine.idle_for() >= after_last + 0.05
    finally:
        engine.shutdown()
