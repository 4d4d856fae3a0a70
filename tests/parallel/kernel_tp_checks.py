"""The gpu and tpu attention kernels under tensor parallelism, run by test_kernels_tp.py in a
subprocess with 4 fake CPU devices: `tfjax generate`'s greedy loop (`generate_greedy`) with
each backend's real Pallas kernels (interpreted on CPU, inside `shard_map` over the KV-head
axis at TP 2 and 4) must give the tokens the cpu backend gives on one device.

Prints one line per (backend, tp) and raises AssertionError on a mismatch.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax

from models import LoadedModel
from models.attention import backend_for
from models.errors import UserError
from models.sharding import make_mesh, placement
from models.weights import init_random
from serving.generate_cmd import generate_greedy
from tests.fakes import FakeTokenizer
from tests.test_runner_engine import TINY

# 8 query / 4 KV heads: 2 or 1 KV heads per device at TP 2 and 4.
CFG = dataclasses.replace(TINY, vocab_size=256, num_heads=8, num_kv_heads=4, head_dim=16)
PROMPT = [5, 17, 42, 99, 3, 250, 7]
NUM_TOKENS = 4


def greedy_tokens(host_weights, tp: int, backend_name: str) -> list[int]:
    mesh = make_mesh(tp, CFG)
    model = LoadedModel(
        name="tiny",
        config=CFG,
        weights=jax.device_put(host_weights, placement(CFG, tp)),
        tokenizer=FakeTokenizer(),
        source=Path("."),
        mesh=mesh,
        quantization=None,
        from_cache=False,
    )
    backend = backend_for(backend_name, interpret=True, mesh=mesh)
    return [token for token, _ in generate_greedy(model, PROMPT, NUM_TOKENS, backend)]


def main() -> int:
    assert len(jax.devices()) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    host = jax.device_get(init_random(CFG, jax.random.key(2), scale=0.3))
    want = greedy_tokens(host, 1, "cpu")
    assert len(want) == NUM_TOKENS, want
    for name in ("gpu", "tpu"):
        for tp in (1, 2, 4):
            try:
                got = greedy_tokens(host, tp, name)
            except UserError as err:  # the interpreted TPU kernel needs a core per shard
                print(f"{name} tp={tp}: skipped, {err}", flush=True)
                continue
            assert got == want, f"{name} tp={tp}: {got} != cpu tp=1 {want}"
            print(f"{name} tp={tp}: greedy tokens equal", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
