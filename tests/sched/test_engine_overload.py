"""The real engine on the fake runner with a CPU-shaped step cost: tokenflow against fcfs.

`CostedRunner` advances a fake clock by what each step would cost on this repo's CPU (decode
46 / 136 / 291 ms at batch 1 / 8 / 32, linear in between; prefill 2.75 ms a token), so the
engine measures those costs and the policies plan with them, as they would live.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from tests.fakes import FakeRunner, FakeTokenizer, drive, reference_tokens
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.request import Request, SamplingParams
from tfjax.sched.base import Costs
from tfjax.sched.registry import make_policy

CPU_STEPS = {1: 0.046, 8: 0.136, 32: 0.291}


class CostedRunner(FakeRunner):
    """A `FakeRunner` whose steps take CPU-shaped time on a fake clock; records batch sizes."""

    prefill_token_s = 2.75e-3

    def __init__(self, *, num_pages: int) -> None:
        super().__init__(num_pages=num_pages, page_size=4)
        self.decode_step_s = dict(CPU_STEPS)
        self._model = Costs(decode_step_s=dict(CPU_STEPS))
        self.now = 0.0
        self.batches: list[int] = []

    def clock(self) -> float:
        return self.now

    def prefill(self, request: Request, num_tokens: int) -> np.ndarray:
        self.now += num_tokens * self.prefill_token_s
        return super().prefill(request, num_tokens)

    def decode(self, requests: Sequence[Request]) -> np.ndarray:
        self.now += self._model.decode_step_time(len(requests))
        self.batches.append(len(requests))
        return super().decode(requests)


def burst(n: int, *, rate: float | None, streaming: bool = True, max_tokens: int = 24):
    """n requests at t=0 with ~17-token prompts; rate None: the server default (15 tok/s)."""
    return [
        Request(
            request_id=f"r{i:02d}",
            prompt_ids=[3 + (7 * i + j) % 900 for j in range(15 + i % 5)],
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            arrival_s=0.0,
            consumption_rate=rate or EngineConfig().default_consumption_rate,
            streaming=streaming,
        )
        for i in range(n)
    ]


def run(policy: str, requests: list[Request], *, num_pages: int = 1024):
    """Drive the engine until every request finishes; returns (runner, finish time per id)."""
    runner = CostedRunner(num_pages=num_pages)
    finished: dict[str, float] = {}

    def emit(request_id: str, delta) -> None:
        if delta.finish_reason is not None:
            finished[request_id] = runner.now

    config = EngineConfig(page_size=4, max_batch_size=32, prefill_token_budget=512, policy=policy)
    engine = Engine(
        runner, FakeTokenizer(), config, make_policy(policy), emit=emit, clock=runner.clock
    )
    for r in requests:
        engine.add_request(r)
    drive(engine, [])
    for r in requests:
        assert r.output_ids == reference_tokens(r.prompt_ids, r.sampling.max_tokens)
    return runner, finished


@pytest.mark.parametrize("rate", [15.0, None], ids=["declared-15", "undeclared"])
def test_overloaded_burst_runs_fcfs_batches(rate: float | None) -> None:
    # 32 readers at 15 tok/s want 480 tok/s; a batch of 32 makes 32 / 0.291 = 110 tok/s. The
    # whole burst fits in the pages and the batch cap, so fcfs prefills all 32 prompts (two
    # steps of the 512-token budget, nothing decodes meanwhile) and then decodes all 32
    # together until they finish together.
    fcfs_runner, fcfs_done = run("fcfs", burst(32, rate=rate))
    assert fcfs_runner.batches == [32] * 23  # 24 tokens: the first comes from the prefill
    tf_runner, tf_done = run("tokenflow", burst(32, rate=rate))
    assert tf_runner.batches == fcfs_runner.batches
    assert max(tf_done.values()) <= max(fcfs_done.values())
    # Hand check: 32 * 15 + 61 = 541 prompt tokens at 2.75 ms, then 23 decode steps of 291 ms.
    assert max(tf_done.values()) == pytest.approx(541 * 2.75e-3 + 23 * 0.291)


def test_overloaded_burst_larger_than_the_batch_cap_matches_fcfs() -> None:
    # 48 undeclared readers: 32 run at once, the other 16 follow as the first finish; every
    # step decodes at least as many rows as fcfs's step at the same point, and no later finish.
    fcfs_runner, fcfs_done = run("fcfs", burst(48, rate=None))
    tf_runner, tf_done = run("tokenflow", burst(48, rate=None))
    assert max(fcfs_runner.batches) == max(tf_runner.batches) == 32
    assert tf_runner.batches == fcfs_runner.batches
    assert max(tf_done.values()) <= max(fcfs_done.values())


def test_non_streaming_burst_is_served_as_fcfs_serves_it() -> None:
    # Non-streaming requests read at the end: each wants one batch row's rate, so a burst of
    # them is exactly at capacity and tokenflow serves it as fcfs does, step for step. The pool
    # of 160 pages (4 tokens each) is short of the 24 requests' ~11 pages at full length, so
    # both preempt the newest under memory pressure, and only then.
    fcfs_runner, fcfs_done = run("fcfs", burst(24, rate=1.0, streaming=False), num_pages=160)
    tf_runner, tf_done = run("tokenflow", burst(24, rate=1.0, streaming=False), num_pages=160)
    assert tf_runner.batches == fcfs_runner.batches
    assert tf_done == fcfs_done


@pytest.mark.parametrize("policy", ["fcfs-chunked", "andes", "tokenflow"])
def test_non_streaming_requests_are_not_paused_for_their_buffer(policy: str) -> None:
    # Readers of 1 tok/s would let a buffer-aware policy pause requests that are ahead; these
    # are non-streaming, so only memory pressure may preempt them (as often as under fcfs),
    # and they finish, on average and the last one, no later than under fcfs (andes's FCFS path
    # packs newcomers slightly differently: within 1%).
    fcfs_requests = burst(24, rate=1.0, streaming=False)
    _, fcfs_done = run("fcfs", fcfs_requests, num_pages=160)
    requests = burst(24, rate=1.0, streaming=False)
    _, done = run(policy, requests, num_pages=160)
    preemptions = sum(r.num_preemptions for r in requests)
    assert preemptions <= sum(r.num_preemptions for r in fcfs_requests)
    assert np.mean(list(done.values())) <= np.mean(list(fcfs_done.values())) * 1.001
    assert max(done.values()) <= max(fcfs_done.values()) * 1.01
