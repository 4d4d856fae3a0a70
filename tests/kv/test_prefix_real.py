"""The prefix cache on a real (tiny, random-weight) model: requests sharing a system prompt,
greedy and seeded sampling, a pool tight enough to preempt, give the same tokens with and
without the cache (shared pages hold exactly the K/V a recompute writes)."""

from __future__ import annotations

import random

import jax
import pytest

from models.weights import init_random
from tests.fakes import FakeTokenizer, drive
from tests.test_engine import Recorder
from tests.test_runner_engine import MAX_LEN, PAGE_SIZE, TINY
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.request import Request, SamplingParams
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy


def shared_prompt_requests() -> list[Request]:
    rng = random.Random(5)
    system = [rng.randrange(3, 1000) for _ in range(37)]  # 4 full pages and a partial one
    out = []
    for i in range(10):
        own = [rng.randrange(3, 1000) for _ in range(1 + 5 * i % 13)]
        sampling = dict(temperature=0.8, top_k=40, seed=100 + i) if i % 2 else {}
        params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)
        out.append(
            Request(f"r{i}", [*system, *own], params, arrival_s=float(i), consumption_rate=10)
        )
    return out


@pytest.mark.slow
def test_shared_system_prompt_gives_identical_tokens_with_and_without_the_cache() -> None:
    weights = init_random(TINY, jax.random.key(0), scale=0.5)
    outputs = []
    for prefix_cache in (True, False):
        config = EngineConfig(
            page_size=PAGE_SIZE,
            prefill_token_budget=16,
            max_batch_size=8,
            prefix_cache=prefix_cache,
        )
        runner = Runner(TINY, weights, config, num_pages=14, max_model_len=MAX_LEN)
        runner.warmup()
        rec = Recorder()
        engine = Engine(
            runner, FakeTokenizer(), config, FcfsPolicy(chunked=True), emit=rec, model_id="tiny"
        )
        drive(engine, shared_prompt_requests())
        outputs.append({r.request_id: rec.tokens(r.request_id) for r in shared_prompt_requests()})
        if prefix_cache:
            assert engine.kv.prefix.stats.num_hit_tokens >= 9 * 32
            assert engine.kv.stats.num_preemptions > 0
    assert outputs[0] == outputs[1]
