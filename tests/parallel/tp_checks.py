"""Tensor-parallel checks, run by test_tensor_parallel.py in a subprocess with 4 fake CPU
devices (XLA_FLAGS must be set before JAX starts, so they cannot share the test process).

Each check prints one line and raises AssertionError on a mismatch.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np

from models.sharding import make_mesh, placement
from models.weights import init_random
from tests.fakes import FakeTokenizer, drive
from tests.kv.test_offload import StormPolicy
from tests.test_engine import Recorder
from tests.test_runner_engine import TINY, requests_for
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.runner import Runner
from tfjax.sched.fcfs import FcfsPolicy

LLAMA = dataclasses.replace(TINY, vocab_size=512, num_heads=8, num_kv_heads=4, head_dim=8)
QWEN2 = dataclasses.replace(
    LLAMA, architecture="qwen2", attention_bias=True, tie_word_embeddings=True
)


def engine_tokens(
    cfg, host_weights, tp: int, *, storm: bool = False, attention_backend: str = "auto"
) -> dict[str, list[int]]:
    """Greedy tokens of 6 requests through the engine (`storm`: random preemptions to the host
    tier and resumes); also `tfjax bench gpu-check`'s gpu-vs-reference check."""
    weights = jax.device_put(host_weights, placement(cfg, tp))
    config = EngineConfig(
        page_size=8, prefill_token_budget=32, max_batch_size=4, attention_backend=attention_backend
    )
    mesh = make_mesh(tp, cfg)
    runner = Runner(cfg, weights, config, num_pages=48, max_model_len=128, mesh=mesh)
    runner.warmup()
    offload = None
    if storm:
        offload = Offload(
            host=HostTier(256, 8),
            transfers=Transfers(runner.pages_sharding, max_bytes_in_flight=1 << 24),
            io=runner,
        )
    policy = StormPolicy(5, 0.2, 0.6) if storm else FcfsPolicy(chunked=True)
    rec = Recorder()
    engine = Engine(runner, FakeTokenizer(), config, policy, emit=rec, offload=offload)
    requests = _requests(cfg)
    drive(engine, requests)
    if storm:
        assert engine.kv.stats.num_loads > 0, "the storm never resumed by LOAD"
    return {r.request_id: rec.tokens(r.request_id) for r in requests}


def _requests(cfg) -> list:
    requests = requests_for(6, max_tokens=10)
    for r in requests:
        r.prompt_ids = [t % cfg.vocab_size for t in r.prompt_ids]
    return requests


def tie_gaps(
    cfg, host_weights, tokens: dict[str, list[int]], reference: dict[str, list[int]]
) -> dict[str, float]:
    """For each request of `engine_tokens` whose `tokens` differ from the `reference` run's:
    at the first differing position, the reference backend's logit of the reference token
    minus that of the other token, given their common prefix (one forward, no engine).

    A near tie flips greedy decoding without any bug (float rounding; TF32 inputs in the GPU
    kernel's float32 dots); a wrong page, position or mask moves logits by whole units."""
    from models.attention import backend_for
    from models.llama import forward, init_kv_cache, logits, single_sequence_step

    backend = backend_for("reference")
    weights = jax.device_put(host_weights)
    prompts = {r.request_id: r.prompt_ids for r in _requests(cfg)}
    gaps = {}
    for rid, ref in reference.items():
        got = tokens.get(rid, [])
        at = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
        if at is None:
            if len(got) != len(ref):
                gaps[rid] = float("inf")
            continue
        sequence = prompts[rid] + ref[:at]
        row_pages = -(-len(sequence) // 8)
        kv = init_kv_cache(cfg, row_pages + 1, 8, backend=backend)
        hidden, _ = forward(
            weights, cfg, single_sequence_step(sequence, 0, 8, row_pages), kv, backend
        )
        row = np.asarray(logits(weights, cfg, hidden[len(sequence) - 1]))
        gaps[rid] = float(row[ref[at]] - row[got[at]])
    return gaps


def logits_of(cfg, host_weights, tp: int) -> np.ndarray:
    from models.llama import forward, init_kv_cache, logits, single_sequence_step
    from models.sharding import kv_sharding

    weights = jax.device_put(host_weights, placement(cfg, tp))
    kv = init_kv_cache(cfg, 9, 8, kv_sharding(make_mesh(tp, cfg)))
    step = single_sequence_step(list(range(3, 40)), 0, 8, 8)
    hidden, _ = jax.jit(lambda w, s, kv: forward(w, cfg, s, kv))(weights, step, kv)
    return np.asarray(logits(weights, cfg, hidden))


def main() -> int:
    assert len(jax.devices()) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    for cfg in (LLAMA, QWEN2):
        host = jax.device_get(init_random(cfg, jax.random.key(1), scale=0.3))
        reference = logits_of(cfg, host, 1)
        tokens = engine_tokens(cfg, host, 1)
        for tp in (2, 4):
            got = logits_of(cfg, host, tp)
            err = np.abs(got - reference).max() / np.abs(reference).max()
            assert err < 1e-5, f"{cfg.architecture} tp={tp}: relative logit error {err:.2e}"
            assert engine_tokens(cfg, host, tp) == tokens, f"{cfg.architecture} tp={tp} tokens"
            print(f"{cfg.architecture} tp={tp}: logits rel err {err:.1e}, greedy tokens equal")
    host = jax.device_get(init_random(LLAMA, jax.random.key(2), scale=0.3))
    assert engine_tokens(LLAMA, host, 2, storm=True) == engine_tokens(LLAMA, host, 1)
    print("llama tp=2: preempt/resume storm through the host tier gives identical tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
