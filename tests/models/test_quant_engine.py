"""The engine on quantized weights: the quantized model is its own reference.

Same pattern as tests/test_runner_engine.py (whose helpers this reuses): batching with chunked
prefill, recompute preemption and both attention backends through a swap storm must give the
tokens of plain one-request-at-a-time greedy decoding with the same int8 weights.

`w8a8` is left out on purpose: rounding each activation to int8 turns the float path's
last-bit differences between step shapes (XLA blocks a [T, D] product differently for each T)
into whole quantization steps now and then, so its tokens can change with the batch (seen here:
one token in the first test); its accuracy is tested in test_quant.py.
"""

from __future__ import annotations

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models import quant
from models.sharding import make_mesh
from models.weights import init_random
from tests.fakes import drive
from tests.kv.test_offload import StormPolicy
from tests.test_runner_engine import TINY, greedy_reference, make_engine, requests_for
from tfjax.metrics import COMPILES
from tfjax.sched.fcfs import FcfsPolicy


@pytest.fixture(scope="module")
def weights():
    one_device = NamedSharding(make_mesh(1, TINY), PartitionSpec())
    return quant.quantize(init_random(TINY, jax.random.key(0), scale=0.5), "int8", one_device)


def test_batched_chunked_engine_matches_one_at_a_time(weights) -> None:
    engine, rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True), budget=16)
    requests = requests_for(12, max_tokens=8)
    compiles = COMPILES.count
    drive(engine, requests, every=2)
    assert COMPILES.count == compiles, "compiled while serving"
    for r in requests[:4]:
        assert rec.tokens(r.request_id) == greedy_reference(weights, r.prompt_ids, 8)


def test_recompute_preemption_keeps_outputs(weights) -> None:
    calm, calm_rec = make_engine(weights, num_pages=128, policy=FcfsPolicy(chunked=True))
    tight, tight_rec = make_engine(weights, num_pages=14, policy=FcfsPolicy(chunked=True))
    drive(calm, requests_for(8, max_tokens=24))
    drive(tight, requests_for(8, max_tokens=24))
    assert tight.kv.stats.num_preemptions > 0
    for r in requests_for(8, max_tokens=24):
        assert tight_rec.tokens(r.request_id) == calm_rec.tokens(r.request_id)


def test_engine_tokens_equal_across_attention_backends(weights) -> None:
    """A swap storm (mixed prefill + decode steps, loads from the host tier) on each backend."""
    results = {}
    for backend in ("cpu", "reference"):
        engine, rec = make_engine(
            weights, num_pages=64, policy=StormPolicy(5, 0.15, 0.6), offload=True, backend=backend
        )
        drive(engine, requests_for(8, max_tokens=12))
        assert engine.kv.stats.num_loads > 0
        results[backend] = {r.request_id: rec.tokens(r.request_id) for r in requests_for(8, 12)}
    assert results["cpu"] == results["reference"]
    for r in requests_for(3, max_tokens=12):
        assert results["cpu"][r.request_id] == greedy_reference(weights, r.prompt_ids, 12)
