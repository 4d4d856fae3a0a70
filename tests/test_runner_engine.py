"""The engine on a real (tiny, random-weight) model: batching, chunking, preemption, offload and
seeded sampling all give the tokens of plain one-request-at-a-time greedy decoding."""

from __future__ import annotations

import dataclasses
import functools
import random

import jax
import numpy as np
import pytest

from models.config import ModelConfig
from models.llama import forward, init_kv_cache, logits, single_sequence_step
from models.weights import init_random
from tests.fakes import FakeTokenizer, drive
from tests.kv.test_offload import StormPolicy
from tests.test_engine import Recorder
from tests.test_logits import numpy_penalties
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.metrics import COMPILES
from tfjax.request import Request, SamplingParams
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy

TINY = ModelConfig(
    architecture="llama",
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    attention_bias=False,
)
PAGE_SIZE = 8
MAX_LEN = 128


@pytest.fixture(scope="module")
def weights():
    return init_random(TINY, jax.random.key(0), scale=0.5)


@functools.cache
def _one_token_step():
    return jax.jit(lambda w, step, kv: forward(w, TINY, step, kv), donate_argnums=2)


def greedy_reference(
    weights, prompt: list[int], num_tokens: int, penalties: SamplingParams | None = None
) -> list[int]:
    """One sequence fed one token per call (a single compiled shape): no engine involved.
    `penalties`: bias and penalties applied by `tests.test_logits.numpy_penalties`."""
    pages = MAX_LEN // PAGE_SIZE
    kv = init_kv_cache(TINY, pages + 1, PAGE_SIZE)
    tokens, out = list(prompt), []
    for pos in range(len(prompt) + num_tokens - 1):
        step = single_sequence_step([tokens[pos]], pos, PAGE_SIZE, pages)
        hidden, kv = _one_token_step()(weights, step, kv)
        if pos >= len(prompt) - 1:
            logits_V = np.asarray(logits(weights, TINY, hidden[0]), np.float32)
            if penalties is not None:
                logits_V = numpy_penalties(logits_V, prompt, out, penalties)
            out.append(int(np.argmax(logits_V)))
            tokens.append(out[-1])
    return out


def make_engine(
    weights, *, num_pages: int, policy, budget: int = 32, offload: bool = False, backend="auto"
):
    config = EngineConfig(
        page_size=PAGE_SIZE,
        prefill_token_budget=budget,
        max_batch_size=8,
        attention_backend=backend,
    )
    runner = Runner(TINY, weights, config, num_pages=num_pages, max_model_len=MAX_LEN)
    runner.warmup()
    io = None
    if offload:
        io = Offload(
            host=HostTier(256, PAGE_SIZE),
            transfers=Transfers(runner.pages_sharding, max_bytes_in_flight=1 << 24),
            io=runner,
        )
    rec = Recorder()
    engine = Engine(runner, FakeTokenizer(), config, policy, emit=rec, offload=io)
    return engine, rec


def requests_for(n: int, max_tokens: int, **sampling) -> list[Request]:
    out = []
    for i in range(n):
        rng = random.Random(i)
        prompt = [rng.randrange(3, 1000) for _ in range(3 + 11 * i % 50)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)
        out.append(Request(f"r{i}", prompt, params, arrival_s=float(i), consumption_rate=10.0))
    return out


def test_batched_chunked_engine_matches_one_at_a_time(weights) -> None:
    engine, rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True), budget=16)
    requests = requests_for(16, max_tokens=8)
    compiles = COMPILES.count
    drive(engine, requests, every=2)
    assert COMPILES.count == compiles, "compiled while serving"
    for r in requests[:6]:
        assert rec.tokens(r.request_id) == greedy_reference(weights, r.prompt_ids, 8)


def test_engine_tokens_equal_across_attention_backends(weights) -> None:
    """The CPU backend and the dense reference give the same tokens through a swap storm
    (mixed prefill + decode steps, several prompts per step, loads), without compiling after
    warm-up, and both give plain one-at-a-time greedy decoding's tokens."""
    results = {}
    for backend in ("cpu", "reference"):
        engine, rec = make_engine(
            weights, num_pages=64, policy=StormPolicy(5, 0.15, 0.6), offload=True, backend=backend
        )
        assert engine.runner.backend.name == backend
        compiles = COMPILES.count
        drive(engine, requests_for(10, max_tokens=12))
        assert COMPILES.count == compiles, f"{backend}: compiled while serving"
        assert engine.kv.stats.num_loads > 0
        results[backend] = {r.request_id: rec.tokens(r.request_id) for r in requests_for(10, 12)}
    assert results["cpu"] == results["reference"]
    for r in requests_for(4, max_tokens=12):
        assert results["cpu"][r.request_id] == greedy_reference(weights, r.prompt_ids, 12)


def test_one_runner_call_per_step_batches_prompts(weights) -> None:
    """Several waiting prompts are prefilled in one call beside the decode rows."""
    engine, _ = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True), budget=64)
    calls = []
    step = engine.runner.step
    engine.runner.step = lambda prefill, decode: (
        calls.append((len(prefill), len(decode))) or (step(prefill, decode))
    )
    for request in requests_for(6, max_tokens=4):
        engine.add_request(request)  # all waiting at once
    drive(engine, [])
    assert any(p >= 2 for p, _ in calls), calls
    assert any(p and d for p, d in calls), "no step mixed prefill chunks with decode rows"


def test_recompute_preemption_keeps_outputs(weights) -> None:
    calm, calm_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    tight, tight_rec = make_engine(weights, num_pages=14, policy=FcfsPolicy(chunked=True))
    drive(calm, requests_for(8, max_tokens=24))
    drive(tight, requests_for(8, max_tokens=24))
    assert tight.kv.stats.num_preemptions > 0
    for r in requests_for(8, max_tokens=24):
        assert tight_rec.tokens(r.request_id) == calm_rec.tokens(r.request_id)


def test_recompute_preemption_keeps_penalised_outputs_and_logprobs(weights) -> None:
    """Penalties count the tokens a request holds, and logprobs come with each appended
    token, so re-prefilling a preempted request changes neither."""
    sampling = dict(presence_penalty=0.8, repetition_penalty=1.3, logprobs=2)
    calm, calm_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    tight, tight_rec = make_engine(weights, num_pages=14, policy=FcfsPolicy(chunked=True))
    drive(calm, requests_for(8, max_tokens=24, **sampling))
    drive(tight, requests_for(8, max_tokens=24, **sampling))
    assert tight.kv.stats.num_preemptions > 0
    for r in requests_for(8, max_tokens=24):
        assert tight_rec.tokens(r.request_id) == calm_rec.tokens(r.request_id)
        calm_lps, tight_lps = (
            [lp for d in rec.deltas[r.request_id] for lp in d.logprobs or ()]
            for rec in (calm_rec, tight_rec)
        )
        assert [lp.token_id for lp in tight_lps] == tight_rec.tokens(r.request_id)
        for a, b in zip(calm_lps, tight_lps, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_transfers_overlapping_steps_never_corrupt_kv(weights) -> None:
    """Swap storm with async copies vs the same storm with every copy forced synchronous."""
    results = []
    for sync in (False, True):
        engine, rec = make_engine(
            weights, num_pages=64, policy=StormPolicy(9, 0.15, 0.6), offload=True
        )
        drive(engine, requests_for(12, max_tokens=16), sync_transfers=sync)
        assert engine.kv.stats.num_loads > 0
        results.append({r.request_id: rec.tokens(r.request_id) for r in requests_for(12, 16)})
    assert results[0] == results[1]
    calm, calm_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    drive(calm, requests_for(12, max_tokens=16))
    assert results[0] == {r.request_id: calm_rec.tokens(r.request_id) for r in requests_for(12, 16)}


def test_seeded_sampling_ignores_batch_neighbours(weights) -> None:
    sampling = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone, alone_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    target = requests_for(1, max_tokens=12, **sampling)[0]
    drive(alone, [target])
    crowd, crowd_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    others = requests_for(6, max_tokens=12, temperature=0.7, seed=7)[1:]
    target = requests_for(1, max_tokens=12, **sampling)[0]
    drive(crowd, [others[0], others[1], target, *others[2:]])
    assert crowd_rec.tokens("r0") == alone_rec.tokens("r0")
    assert alone_rec.tokens("r0") != greedy_reference(weights, target.prompt_ids, 12)


def test_sampling_respects_top_k_one_as_greedy(weights) -> None:
    engine, rec = make_engine(weights, num_pages=64, policy=FcfsPolicy(chunked=True))
    request = requests_for(1, max_tokens=6, temperature=1.5, top_k=1, seed=3)[0]
    drive(engine, [request])
    assert rec.tokens("r0") == greedy_reference(weights, request.prompt_ids, 6)
    assert np.all(np.asarray(rec.tokens("r0")) >= 0)


def test_penalties_in_the_engine_match_numpy_beside_plain_rows(weights) -> None:
    """Greedy rows with bias and penalties give the numpy reference's tokens; their plain
    neighbours keep plain greedy tokens; the penalised sampler was compiled at warm-up."""
    engine, rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    penalised = [
        dict(presence_penalty=1.5, frequency_penalty=0.5),
        dict(repetition_penalty=1.8, logit_bias=((7, 5.0), (11, -100.0))),
        dict(frequency_penalty=-0.7, presence_penalty=-0.3, repetition_penalty=0.6),
    ]
    requests = requests_for(6, max_tokens=10)
    for i, extra in enumerate(penalised):
        requests[2 * i] = requests_for(2 * i + 1, max_tokens=10, **extra)[2 * i]
    compiles = COMPILES.count
    drive(engine, requests)
    assert COMPILES.count == compiles, "compiled while serving"
    for r in requests:
        want = greedy_reference(
            weights, r.prompt_ids, 10, r.sampling if r.sampling.has_penalties else None
        )
        assert rec.tokens(r.request_id) == want, r.sampling
    plain = [greedy_reference(weights, r.prompt_ids, 10) for r in requests[::2]]
    assert plain != [rec.tokens(r.request_id) for r in requests[::2]], "penalties changed nothing"


def teacher_forced_logits(weights, prompt: list[int], output: list[int]) -> np.ndarray:
    """[len(output), V] float32: the logits each output token was sampled from."""
    pages = MAX_LEN // PAGE_SIZE
    kv = init_kv_cache(TINY, pages + 1, PAGE_SIZE)
    tokens, rows = prompt + output, []
    for pos in range(len(tokens) - 1):
        step = single_sequence_step([tokens[pos]], pos, PAGE_SIZE, pages)
        hidden, kv = _one_token_step()(weights, step, kv)
        if pos >= len(prompt) - 1:
            rows.append(np.asarray(logits(weights, TINY, hidden[0]), np.float32))
    return np.stack(rows)


def test_logprobs_are_the_raw_log_softmax(weights) -> None:
    """Greedy and temperature-0.7 rows with logprobs (one with penalties, which logprobs
    ignore) beside rows without: each token's logprob and top-5 equal torch's log-softmax of
    the logits it was sampled from; rows that did not ask get none; nothing compiles."""
    import torch

    engine, rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    asked = [
        dict(logprobs=5),
        dict(logprobs=5, temperature=0.7, seed=11),
        dict(logprobs=0, temperature=0.7, seed=12, presence_penalty=1.0),
    ]
    requests = requests_for(5, max_tokens=8)
    for i, extra in enumerate(asked):
        requests[i] = requests_for(i + 1, max_tokens=8, **extra)[i]
    compiles = COMPILES.count
    drive(engine, requests)
    assert COMPILES.count == compiles, "compiled while serving"
    for r in requests:
        logprobs = [lp for d in rec.deltas[r.request_id] if d.logprobs for lp in d.logprobs]
        if r.sampling.logprobs is None:
            assert all(d.logprobs is None for d in rec.deltas[r.request_id])
            continue
        output = rec.tokens(r.request_id)
        assert [lp.token_id for lp in logprobs] == output
        want = torch.log_softmax(
            torch.from_numpy(teacher_forced_logits(weights, r.prompt_ids, output)), dim=-1
        ).numpy()
        got = np.array([lp.logprob for lp in logprobs])
        np.testing.assert_allclose(got, want[np.arange(len(output)), output], atol=1e-4)
        for lp, row in zip(logprobs, want, strict=True):
            assert len(lp.top) == r.sampling.logprobs
            top_ids = [t for t, _ in lp.top]
            np.testing.assert_allclose([v for _, v in lp.top], row[top_ids], atol=1e-4)
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            if lp.top:
                assert lp.top[0][1] == pytest.approx(row.max(), abs=1e-4)


def test_tiny_config_is_a_replaceable_base() -> None:
    assert dataclasses.replace(TINY, num_layers=1).num_layers == 1
