"""Tensor-parallel overheads: per-device KV capacity and decode throughput at TP 1 / 2 / 4.

    python scripts/bench_tp.py [--layers 4] [--batch 8] [--device-kv-gb 1.0]

Runs on 4 fake CPU devices (it re-executes itself with XLA_FLAGS set when fewer exist). Fake
devices share the same cores and memory, so the throughput column shows only what sharding
and XLA's collectives cost on one machine, never a speed-up; the capacity column is exact:
the KV of each page is split over the devices by KV head, so a per-device budget holds TP
times more tokens. The model is SmolLM2-135M-shaped with random weights and `--layers` layers
(fewer than 30 to keep compile time small; per-layer costs scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

NUM_FAKE_DEVICES = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device-kv-gb", type=float, default=1.0)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    if len(jax.devices()) < NUM_FAKE_DEVICES:
        flags = f"--xla_force_host_platform_device_count={NUM_FAKE_DEVICES}"
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.getcwd())
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from models.config import ModelConfig
    from models.sharding import make_mesh, placement
    from models.weights import init_random
    from tfjax.config import EngineConfig
    from tfjax.kv.manager import PrefillWork
    from tfjax.kv.pages import PageAllocator
    from tfjax.request import Request, SamplingParams
    from tfjax.runner import Runner, kv_bytes_per_token

    cfg = ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=args.layers, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=2048, tie_word_embeddings=True,
        attention_bias=False,
    )  # fmt: skip
    # SmolLM2 has 3 KV heads; TP must divide them, so the benchmark uses 4 for TP 2 and 4.
    cfg = dataclasses.replace(cfg, num_heads=8, num_kv_heads=4)
    host_weights = jax.device_get(init_random(cfg, jax.random.key(0)))
    config = EngineConfig(max_batch_size=args.batch, max_model_len=256, prefill_token_budget=128)
    rows = []
    for tp in (1, 2, 4):
        weights = jax.device_put(host_weights, placement(cfg, tp))
        runner = Runner(cfg, weights, config, num_pages=1 + args.batch * 16, max_model_len=256,
                        mesh=make_mesh(tp, cfg))  # fmt: skip
        pages = PageAllocator(runner.num_pages)
        requests = []
        for i in range(args.batch):
            prompt = np.random.default_rng(i).integers(10, cfg.vocab_size, 64).tolist()
            r = Request(f"r{i}", prompt, SamplingParams(max_tokens=64, ignore_eos=True), 0.0, 1.0)
            r.page_ids = pages.allocate(10)
            token = runner.step([PrefillWork(r, 64)], [])
            r.num_computed_tokens = 64
            r.output_ids.append(int(np.asarray(token)[0]))
            requests.append(r)
        step_s = []
        for step in range(args.steps + 1):
            start = time.perf_counter()
            tokens = np.asarray(runner.step([], requests))
            if step:  # the first call compiles
                step_s.append(time.perf_counter() - start)
            for r, token in zip(requests, tokens, strict=False):
                r.num_computed_tokens += 1
                r.output_ids.append(int(token))
        per_token_device_bytes = kv_bytes_per_token(cfg) / tp
        rows.append({
            "tp": tp,
            "kv_tokens_per_device_budget": int(args.device_kv_gb * 1e9 / per_token_device_bytes),
            "decode_tokens_per_s": args.batch / statistics.median(step_s),
            "step_ms": 1e3 * statistics.median(step_s),
        })  # fmt: skip
    print(f"{'TP':>3} {'KV tokens per device (' + str(args.device_kv_gb) + ' GB)':>30} "
          f"{'decode tok/s':>13} {'step ms':>8}")  # fmt: skip
    for row in rows:
        print(f"{row['tp']:>3} {row['kv_tokens_per_device_budget']:>30,} "
              f"{row['decode_tokens_per_s']:>13.1f} {row['step_ms']:>8.1f}")  # fmt: skip
    print("fake CPU devices share one machine: throughput shows overhead only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
