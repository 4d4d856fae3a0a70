"""The suite-wide idle check (`tests.conftest.broken_idle_engines`) finds an idle engine whose
page books do not balance, and ignores one that is mid-run."""

from __future__ import annotations

from tests.conftest import broken_idle_engines
from tests.fakes import FakeRunner, FakeTokenizer
from tests.test_engine import make_request
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.sched.registry import make_policy


def make_engine() -> Engine:
    config = EngineConfig(page_size=4, prefill_token_budget=16, max_batch_size=4)
    runner = FakeRunner(num_pages=16)
    return Engine(runner, FakeTokenizer(), config, make_policy("fcfs"), emit=lambda *_: None)


def test_an_idle_engine_with_a_leaked_page_is_reported() -> None:
    engine = make_engine()
    leaked = engine.kv.device.allocate(1)  # a page no request owns
    try:
        assert any(f"{id(engine):#x}" in problem for problem in broken_idle_engines())
    finally:
        engine.kv.device.free(leaked)
    assert not any(f"{id(engine):#x}" in problem for problem in broken_idle_engines())


def test_an_engine_mid_run_is_skipped() -> None:
    engine = make_engine()
    engine.add_request(make_request(0, prompt_len=6, max_tokens=8))
    engine.step()
    leaked = engine.kv.device.allocate(1)
    try:
        assert not any(f"{id(engine):#x}" in problem for problem in broken_idle_engines())
    finally:
        engine.kv.device.free(leaked)
