"""Serving while step buckets still compile: a runner warmed up on two tiny buckets serves
requests at once (their steps padded or split into those two), then compiles the rest on its
background thread while more requests run. Every token and logprob equals a fully warmed-up
engine's, nothing compiles on the serving path, and every bucket is compiled at the end."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from models.weights import init_random
from tests.fakes import FakeTokenizer, drive
from tests.test_engine import Recorder
from tests.test_runner_engine import PAGE_SIZE, TINY, greedy_reference, requests_for
from tfjax.compile_plan import calls_for
from tfjax.config import Bucket, EngineConfig
from tfjax.engine import Engine
from tfjax.executables import IDLE_S
from tfjax.metrics import COMPILES
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy

# 64-token chunks are two tiles: with only one-tile buckets compiled, a chunk is split.
# Six step buckets (compiles dominate this test's time).
CONFIG = EngineConfig(page_size=PAGE_SIZE, prefill_token_budget=64, max_batch_size=2)
TINY_FIRST = (Bucket(0, 1), Bucket(1, 0))
MAX_TOKENS = 6
MAX_LEN = 64  # prompts up to 52 tokens, plus the outputs; four page-copy sizes
COMPILE_TIMEOUT_S = 600  # the whole table on a busy 2-core machine


@pytest.fixture(scope="module")
def weights():
    return init_random(TINY, jax.random.key(0), scale=0.5)


def make_engine(runner: Runner) -> tuple[Engine, Recorder]:
    rec = Recorder()
    return Engine(runner, FakeTokenizer(), CONFIG, FcfsPolicy(chunked=True), emit=rec), rec


def workload() -> list:
    """Prompts of 3..52 tokens, greedy; two rows ask for logprobs (the scored variant)."""
    requests = requests_for(8, max_tokens=MAX_TOKENS)
    for i in (1, 6):
        requests[i] = requests_for(i + 1, max_tokens=MAX_TOKENS, logprobs=3)[i]
    return requests


def outputs(rec: Recorder, request_id: str) -> tuple[list[int], list[tuple[int, float]]]:
    logprobs = [
        (lp.token_id, lp.logprob) for d in rec.deltas[request_id] if d.logprobs for lp in d.logprobs
    ]
    return rec.tokens(request_id), logprobs


def test_serves_before_every_bucket_is_compiled(weights) -> None:
    # This runner first: its background thread must really compile, not find the reference
    # runner's executables in JAX's in-memory cache.
    runner = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    runner.warmup(first=TINY_FIRST)
    table = runner.executables
    done, total = table.compile_progress()
    assert done < total and not table.all_compiled.is_set()
    engine, rec = make_engine(runner)
    requests = workload()
    compiles = COMPILES.count

    drive(engine, requests[:4], every=1)  # only the two tiny buckets
    assert runner.num_fallback_steps > engine.num_steps / 2  # padded or split
    table.compile_rest_in_background()
    drive(engine, requests[4:], every=1)  # while the rest compiles
    assert table.all_compiled.wait(COMPILE_TIMEOUT_S), "background compiles did not finish"
    # The background compiles were real (this runner came first), and counted apart.
    assert COMPILES.count == compiles, "compiled on the serving path"
    assert table.compile_progress() == (total, total)

    warm = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    warm.warmup()
    assert warm.executables.all_compiled.is_set()
    reference_engine, reference = make_engine(warm)
    drive(reference_engine, workload(), every=1)
    for r in requests:
        tokens, logprobs = outputs(rec, r.request_id)
        want_tokens, want_logprobs = outputs(reference, r.request_id)
        assert tokens == want_tokens
        assert len(tokens) == MAX_TOKENS
        assert [t for t, _ in logprobs] == [t for t, _ in want_logprobs]
        np.testing.assert_allclose(
            [v for _, v in logprobs], [v for _, v in want_logprobs], atol=1e-5
        )
        assert bool(logprobs) == (r.sampling.logprobs is not None)


def test_a_busy_engine_gets_only_the_buckets_its_padding_pays_for(weights) -> None:
    """While the engine steps, the compile thread compiles a bucket whose steps padded
    enough, and nothing else; once the engine is idle, the rest."""
    runner = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    runner.warmup(first=TINY_FIRST)
    table = runner.executables
    engine_idle_s = 0.0  # stepping
    table.compile_rest_in_background(lambda: engine_idle_s)
    two_rows = Bucket(0, 2)
    table.ran_padded(two_rows, calls_for(0, 2, table.compiled))  # split in two: worth it
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    while two_rows not in table.compiled:
        assert time.monotonic() < deadline, "the padded bucket did not compile"
        time.sleep(0.05)
    time.sleep(3 * IDLE_S)  # the thread waits while the engine is busy
    assert table.compiled == {*TINY_FIRST, two_rows}
    assert not table.all_compiled.is_set()
    engine_idle_s = IDLE_S
    assert table.all_compiled.wait(COMPILE_TIMEOUT_S), "the idle engine's compiles did not finish"


def test_a_compile_abandoned_between_its_phases_publishes_nothing(weights) -> None:
    runner = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    runner.warmup(first=TINY_FIRST)
    table = runner.executables
    table.compile_step(Bucket(0, 2), proceed=lambda: False)
    assert table.compiled == set(TINY_FIRST) and Bucket(0, 2) not in table.forwards


def test_page_copies_pad_to_a_compiled_size(weights) -> None:
    """With one page and the largest size compiled, three pages travel in the largest, and
    the write-through copies one page at a time until the size of two is compiled."""
    runner = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    runner.warmup(first=TINY_FIRST)
    assert runner.max_gather_pages == 1
    gathered = runner.gather([1, 2, 3])
    assert gathered.shape[2] == runner.max_pages_per_row
    values = np.random.default_rng(0).standard_normal(gathered.shape).astype(gathered.dtype)
    runner.scatter([4, 5, 6], jax.device_put(values, gathered.sharding))
    moved = np.asarray(runner.gather([4, 5, 6]))
    np.testing.assert_array_equal(moved[:, :, :3], values[:, :, :3])
    runner.executables.compile_rest_in_background()
    assert runner.executables.all_compiled.wait(COMPILE_TIMEOUT_S)
    assert runner.max_gather_pages == runner.max_pages_per_row
    assert runner.gather([1, 2, 3]).shape[2] == 4


def test_a_runner_never_warmed_up_compiles_each_shape_when_first_needed(weights) -> None:
    """What calibration relies on: without `warmup`, every step runs in its own bucket,
    compiled the first time it is needed, and nothing else compiles."""
    runner = Runner(TINY, weights, CONFIG, num_pages=64, max_model_len=MAX_LEN)
    engine, rec = make_engine(runner)
    requests = requests_for(2, max_tokens=MAX_TOKENS)
    drive(engine, requests, every=1)
    assert runner.num_fallback_steps == 0
    done, total = runner.executables.compile_progress()
    assert done < total
    assert runner.max_gather_pages == runner.max_pages_per_row
    for r in requests:
        assert rec.tokens(r.request_id) == greedy_reference(weights, r.prompt_ids, MAX_TOKENS)
