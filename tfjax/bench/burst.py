"""`tfjax bench burst`: a burst of concurrent streams through the serving engine on random
weights: time to first token, output tokens/s, and that nothing is lost or leaked.

    tfjax bench burst --shape llama3-8b --streams 64 [engine flags of tfjax serve]

The engine is the one `tfjax serve` runs behind HTTP (`AsyncEngine` over `assemble_engine`:
the policy, the host KV tier, background compiles, all with serve's defaults and flags); every
stream is submitted at once as token ids (random prompts of `--prompt-len` tokens, greedy,
`ignore_eos`, `--max-tokens` each) and read as it arrives. HTTP and detokenizing are left out:
random weights come without a tokenizer, and the GPU image cannot carry the default model
(`tfjax bench serve` measures a running server over HTTP). Checks, each failing the exit code:
every stream ends with exactly `--max-tokens` tokens and no error, and afterwards the engine's
idle invariants hold (every KV page back in the pool). Writes DIR/bench_burst.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models.cache import default_cache_dir
from tfjax.api import Delta
from tfjax.async_engine import AsyncEngine, serve_runner, warm_up
from tfjax.bench.engine import SHAPES, random_weights
from tfjax.bench.flags import HelpFormatter
from tfjax.config import add_engine_arguments, engine_config_from_args
from tfjax.request import SamplingParams
from tfjax.runner import enable_compilation_cache
from tfjax.runner_setup import make_runner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench burst", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, else bfloat16")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per stream")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_burst"))
    add_engine_arguments(parser)
    return parser


async def _read(stream: Any, start: float) -> dict[str, Any]:
    """One stream's first-token time, token count and end."""
    first_s, tokens, last = None, 0, Delta("", (), 0, 0)
    async for delta in stream:
        tokens += len(delta.token_ids)
        if first_s is None and delta.token_ids:
            first_s = time.monotonic() - start
        last = delta
    end_s = time.monotonic() - start
    return {
        "ttft_s": first_s,
        "end_s": end_s,
        "tokens": tokens,
        "error": last.error,
        "preemptions": last.num_preemptions,
    }


async def run_burst(served: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Submit every prompt at once, read every stream, then check the engine's invariants."""
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.monotonic()
    streams = [served.submit(prompt, sampling) for prompt in prompts]
    ends = await asyncio.gather(*(_read(s, start) for s in streams))
    wall_s = time.monotonic() - start
    problem = await served.check_invariants()
    ttfts = [e["ttft_s"] for e in ends if e["ttft_s"] is not None]
    complete = [e for e in ends if e["tokens"] == max_tokens and e["error"] is None]
    return {
        "streams": len(prompts),
        "complete_streams": len(complete),
        "errors": sorted({e["error"] for e in ends if e["error"]}),
        "invariants": problem or "ok",
        "wall_s": wall_s,
        "output_tokens_per_s": sum(e["tokens"] for e in ends) / wall_s,
        "ttft_median_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "ttft_max_s": max(ttfts, default=None),
        "end_median_s": statistics.median(e["end_s"] for e in ends),
        "preemptions": sum(e["preemptions"] for e in ends),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = engine_config_from_args(args)
    enable_compilation_cache(default_cache_dir())
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg, weights = random_weights(args.shape, dtype, args.quantization, args.seed)
    runner = make_runner(cfg, weights, config)
    if args.prompt_len + args.max_tokens > runner.max_model_len:
        print(f"--prompt-len + --max-tokens exceed the context ({runner.max_model_len})")
        return 2
    compile_start = time.monotonic()
    warm_up(runner, config)
    compile_s = time.monotonic() - compile_start
    served = serve_runner(
        runner,
        config,
        model_name=args.shape,
        tokenizer=None,
        max_waiting=max(config.max_waiting, args.streams),
    )
    rng = np.random.default_rng(args.seed)
    vocab, prompt_len = cfg.vocab_size, args.prompt_len
    prompts = [rng.integers(10, vocab, prompt_len).tolist() for _ in range(args.streams)]
    try:
        result = asyncio.run(run_burst(served, prompts, args.max_tokens))
    finally:
        served.shutdown()
    result.update(
        device_kind=jax.devices()[0].device_kind,
        model=args.shape,
        dtype=dtype,
        policy=config.policy,
        max_batch_size=config.max_batch_size,
        num_pages=runner.num_pages,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        startup_compile_s=compile_s,
    )
    result["passed"] = result["complete_streams"] == args.streams and result["invariants"] == "ok"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_burst.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_burst.json'}", file=sys.stderr)
    return 0 if result["passed"] else 1
