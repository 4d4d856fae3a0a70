"""`tfjax bench engine tp`: tensor-parallel overheads, per-device KV capacity and decode
throughput at TP 1 / 2 / 4.

    tfjax bench engine tp [--layers 4] [--batch 8] [--device-kv-gb 1.0]

Runs on 4 fake CPU devices (it re-executes itself with XLA_FLAGS set when fewer exist). Fake
devices share the same cores and memory, so the throughput column shows only what sharding
and XLA's collectives cost on one machine, never a speed-up; the capacity column is exact:
the KV of each page is split over the devices by KV head, so a per-device budget holds TP
times more tokens. The model is SmolLM2-135M-shaped with random weights and `--layers` layers
(fewer than 30 to keep compile time small; per-layer costs scale), 4 KV heads instead of 3 so
that TP 2 and 4 divide them; each row prefills `--batch` 64-token prompts and times the
median of `--steps` decode steps (`tfjax.bench.engine.bench_ours`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tfjax.bench.flags import HelpFormatter
from tfjax.bench.server import REPO

NUM_FAKE_DEVICES = 4
PROMPT_LEN = 64
MAX_MODEL_LEN = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench engine tp", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4, help="layers of the random model")
    parser.add_argument("--batch", type=int, default=8, help="requests decoded together")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps")
    parser.add_argument(
        "--device-kv-gb",
        type=float,
        default=1.0,
        help="per-device KV budget of the capacity column",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import jax

    if len(jax.devices()) < NUM_FAKE_DEVICES:
        flags = f"--xla_force_host_platform_device_count={NUM_FAKE_DEVICES}"
        env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(REPO))
        command = [sys.executable, "-m", "serving.cli", "bench", "engine", "tp", *argv]
        os.chdir(REPO)
        os.execve(sys.executable, command, env)
    rows = [measure_tp(tp, args) for tp in (1, 2, 4)]
    print(f"{'TP':>3} {'KV tokens per device (' + str(args.device_kv_gb) + ' GB)':>30} "
          f"{'decode tok/s':>13} {'step ms':>8}")  # fmt: skip
    for row in rows:
        print(f"{row['tp']:>3} {row['kv_tokens_per_device_budget']:>30,} "
              f"{row['decode_tokens_per_s']:>13.1f} {row['step_ms']:>8.1f}")  # fmt: skip
    print("fake CPU devices share one machine: throughput shows overhead only")
    return 0


def measure_tp(tp: int, args: argparse.Namespace) -> dict:
    import jax

    from models.sharding import make_mesh, placement
    from models.weights import init_random
    from tfjax.bench.engine import SMOLLM2_135M, DecodeRun, bench_ours
    from tfjax.config import EngineConfig
    from tfjax.runner import kv_bytes_per_token
    from tfjax.runner_setup import make_runner

    cfg = dataclasses.replace(
        SMOLLM2_135M, num_layers=args.layers, num_heads=8, num_kv_heads=4,
        max_position_embeddings=2048,
    )  # fmt: skip
    weights = jax.device_put(init_random(cfg, jax.random.key(0)), placement(cfg, tp))
    config = EngineConfig(
        max_batch_size=args.batch, max_model_len=MAX_MODEL_LEN, prefill_token_budget=128
    )
    runner = make_runner(
        cfg, weights, config, num_pages=1 + args.batch * 16, mesh=make_mesh(tp, cfg)
    )
    # new_tokens - 2 timed steps: the first decode call compiles and is not timed.
    run = DecodeRun(new_tokens=args.steps + 2, prefill_token_budget=128)
    figures = bench_ours(runner, args.batch, PROMPT_LEN, run)
    per_token_device_bytes = kv_bytes_per_token(cfg) / tp
    return {
        "tp": tp,
        "kv_tokens_per_device_budget": int(args.device_kv_gb * 1e9 / per_token_device_bytes),
        "decode_tokens_per_s": figures["decode_tokens_per_s"],
        "step_ms": figures["decode_step_median_ms"],
    }
