"""Engine loop on the fake runner: batching, chunking, preemption and abort versus one-at-a-time."""

from __future__ import annotations

import random

import pytest

from tests.fakes import FakeRunner, FakeTokenizer, drive, reference_tokens
from tfjax.api import Delta
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.request import FinishReason, Request, SamplingParams
from tfjax.sched.fcfs import FcfsPolicy


class Recorder:
    def __init__(self) -> None:
        self.deltas: dict[str, list[Delta]] = {}

    def __call__(self, request_id: str, delta: Delta) -> None:
        self.deltas.setdefault(request_id, []).append(delta)

    def tokens(self, request_id: str) -> list[int]:
        return [t for d in self.deltas[request_id] for t in d.token_ids]

    def finish(self, request_id: str) -> FinishReason | None:
        return self.deltas[request_id][-1].finish_reason


def make_engine(
    *,
    num_pages: int,
    chunked: bool = True,
    budget: int = 16,
    max_batch: int = 8,
    long_prefill: int = 0,
) -> tuple[Engine, Recorder]:
    config = EngineConfig(
        page_size=4,
        prefill_token_budget=budget,
        max_batch_size=max_batch,
        policy="fcfs",
        long_prefill_token_threshold=long_prefill,
    )
    recorder = Recorder()
    clock = iter(range(10**9))
    engine = Engine(
        FakeRunner(num_pages=num_pages),
        FakeTokenizer(),
        config,
        FcfsPolicy(chunked=chunked),
        emit=recorder,
        clock=lambda: float(next(clock)),
    )
    return engine, recorder


def make_request(i: int, prompt_len: int, max_tokens: int) -> Request:
    rng = random.Random(i)
    return Request(
        request_id=f"r{i}",
        prompt_ids=[rng.randrange(3, 1000) for _ in range(prompt_len)],
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_s=float(i),
        consumption_rate=10.0,
    )


@pytest.mark.parametrize("chunked", [True, False])
def test_concurrent_requests_match_one_at_a_time(chunked: bool) -> None:
    engine, rec = make_engine(num_pages=256, chunked=chunked)
    requests = [make_request(i, prompt_len=1 + 7 * i % 40, max_tokens=5 + i) for i in range(16)]
    expected = {
        r.request_id: reference_tokens(r.prompt_ids, r.sampling.max_tokens) for r in requests
    }
    drive(engine, requests, every=2)
    for request_id, tokens in expected.items():
        assert rec.tokens(request_id) == tokens
        assert rec.finish(request_id) is FinishReason.LENGTH
    assert engine.kv.num_used_pages == 0


def test_small_pool_preempts_by_recompute_and_outputs_stay_identical() -> None:
    engine, rec = make_engine(num_pages=20, max_batch=8)
    requests = [make_request(i, prompt_len=9, max_tokens=20) for i in range(8)]
    drive(engine, requests, every=1)
    assert engine.kv.stats.num_preemptions > 0
    for r in requests:
        assert rec.tokens(r.request_id) == reference_tokens(r.prompt_ids, 20)
    assert engine.kv.num_used_pages == 0


def test_long_prompt_is_chunked_and_running_streams_keep_decoding() -> None:
    engine, rec = make_engine(num_pages=256, budget=8)
    short = make_request(0, prompt_len=3, max_tokens=30)
    engine.add_request(short)
    engine.step()
    long = make_request(1, prompt_len=64, max_tokens=3)
    engine.add_request(long)
    before = len(rec.tokens("r0"))
    for _ in range(8):  # 64 prompt tokens at 8 per step
        engine.step()
    assert len(rec.tokens("r0")) - before == 8, "decode stalled during the long prefill"
    while engine.has_work:
        engine.step()
    assert rec.tokens("r1") == reference_tokens(long.prompt_ids, 3)


def test_short_prompts_behind_a_long_one_start_before_it_with_a_long_prefill_threshold() -> None:
    # Budget 160 tokens (five 32-token tiles), threshold 4: the 64-token prompt, first in line,
    # prefills 4 tokens (a tile) a step and the 3-token prompts behind it take the other four
    # tiles, so they stream long before the long prompt's first token; every output is still
    # the one-at-a-time output.
    engine, rec = make_engine(num_pages=256, budget=160, long_prefill=4)
    long = make_request(0, prompt_len=64, max_tokens=3)
    shorts = [make_request(i, prompt_len=3, max_tokens=10) for i in range(1, 5)]
    for request in (long, *shorts):
        engine.add_request(request)
    engine.step()
    assert all(len(rec.tokens(r.request_id)) == 1 for r in shorts)
    assert "r0" not in rec.deltas or not rec.tokens("r0")
    while engine.has_work:
        engine.step()
    for request in (long, *shorts):
        expected = reference_tokens(request.prompt_ids, request.sampling.max_tokens)
        assert rec.tokens(request.request_id) == expected
    assert engine.kv.num_used_pages == 0


def test_abort_frees_pages_and_ends_stream() -> None:
    engine, rec = make_engine(num_pages=64)
    engine.add_request(make_request(0, prompt_len=10, max_tokens=100))
    for _ in range(5):
        engine.step()
    assert engine.kv.num_used_pages > 0
    engine.abort("r0")
    engine.check_idle()
    assert engine.kv.num_used_pages == 0
    assert rec.finish("r0") is FinishReason.ABORT


def test_stop_string_ends_stream_without_the_stop_text() -> None:
    engine, rec = make_engine(num_pages=64)
    request = make_request(0, prompt_len=5, max_tokens=40)
    text = FakeTokenizer().decode(reference_tokens(request.prompt_ids, 40))
    stop = text[10:13]
    cut = text.index(stop)
    request = Request(
        request_id="r0",
        prompt_ids=request.prompt_ids,
        sampling=SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True),
        arrival_s=0.0,
        consumption_rate=10.0,
    )
    engine.add_request(request)
    while engine.has_work:
        engine.step()
    assert "".join(d.text for d in rec.deltas["r0"]) == text[:cut]
    assert rec.finish("r0") is FinishReason.STOP
