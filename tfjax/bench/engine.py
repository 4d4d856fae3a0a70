"""`tfjax bench engine`: prefill and decode tokens/s of our runner vs HF transformers, each
figure beside its physical floor.

    tfjax bench engine --out out/bench_engine [--batches 1,8,32,64]
    tfjax bench engine --shape llama3-8b --contexts 512,2048 --skip-prefill
    tfjax bench engine tp [--batch 8]       # tensor parallel 1/2/4 on fake CPU devices
    tfjax bench engine xla-cpu --list       # XLA:CPU flag variants on the engine's step shapes
    tfjax bench engine pieces               # each piece of a decode step against its floor

For each batch size b and context c: b random prompts of c tokens are prefilled, packed into
steps of up to `--prefill-token-budget` tokens (several requests per step, as the engine
batches them; prefill tokens/s), then decoded together for `--new-tokens` steps (decode
tokens/s and the median step time). All of ours runs first, then HF transformers `generate`
on the same shapes (torch, float32, greedy, `min_new_tokens` forcing the length; its decode rate
is (b * (n - 1)) / (time of n new tokens - time of 1 new token)), never interleaved.

Floors (`tfjax.bench.floors`), from this machine's measured read bandwidth and matmul rate: a
decode step cannot beat max(bytes it must read / bandwidth, its FLOPs / matmul rate); prefill
cannot beat the matmul rate / FLOPs per token.

`--quantization` (int8, w8a8, gguf; `models.quant`) runs our side on quantized weights (HF stays
float32: the equal-terms baseline), and the read floor counts the quantized bytes. `--shape`
benchmarks random weights of a named shape instead of a checkpoint (no HF side);
`--skip-prefill` decodes over an unfilled cache of the same length (step time depends on the
shapes only), which saves the prefill compiles and time on big models. The first call of each
shape compiles and is not timed. Compare numbers from one run only on a noisy machine.
Writes DIR/bench_engine.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models import quant
from models.attention import BACKEND_NAMES, backend_for
from models.cache import default_cache_dir
from models.config import QUANTIZATIONS, ModelConfig
from models.sharding import make_mesh
from models.weights import Weights, init_random, num_bytes
from tfjax.bench.flags import HelpFormatter
from tfjax.bench.floors import Floors, matmul_flops_per_s, read_bandwidth_bytes_per_s
from tfjax.config import EngineConfig
from tfjax.host_memory import keep_freed_memory
from tfjax.kv.manager import PrefillWork
from tfjax.kv.pages import PageAllocator
from tfjax.request import Request, SamplingParams
from tfjax.runner import Runner, enable_compilation_cache
from tfjax.runner_setup import load_runner, make_runner

SMOLLM2_135M = ModelConfig(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    attention_bias=False,
)
LLAMA3_8B = dataclasses.replace(
    SMOLLM2_135M,
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
SHAPES = {"smollm2-135m": SMOLLM2_135M, "llama3-8b": LLAMA3_8B}
# `tfjax bench engine MODE ...`: the engine microbenchmarks with their own flags.
MODES = {
    "tp": "tfjax.bench.engine_tp",
    "xla-cpu": "tfjax.bench.engine_xla_cpu",
    "pieces": "tfjax.bench.engine_pieces",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeRun:
    """How `bench_ours` drives the runner."""

    new_tokens: int
    prefill_token_budget: int = 512
    skip_prefill: bool = False  # decode over an unfilled cache of the same length
    seed: int = 0


def make_requests(
    runner: Runner, batch: int, context: int, new_tokens: int, seed: int
) -> list[Request]:
    """`batch` requests of `context` random prompt tokens, their pages allocated for the run."""
    rng = np.random.default_rng(seed)
    pages = PageAllocator(runner.num_pages)
    requests = []
    for i in range(batch):
        prompt = rng.integers(10, runner.cfg.vocab_size, context).tolist()
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        request = Request(f"b{i}", prompt, params, 0.0, 10.0)
        request.page_ids = pages.allocate(-(-(context + new_tokens) // runner.page_size))
        requests.append(request)
    return requests


def prefill_all(runner: Runner, requests: list[Request], budget: int) -> float:
    """Prefill every prompt in steps of at most `budget` tokens; return seconds."""
    for request in requests:
        request.num_computed_tokens, request.output_ids = 0, []
    start = time.perf_counter()
    pending = list(requests)
    while pending:
        chunks, left = [], budget
        for request in pending:
            n = min(request.num_uncomputed_prefill, left)
            if n == 0:
                break
            chunks.append(PrefillWork(request, n))
            left -= n
        ids = np.asarray(runner.step(chunks, []))
        for chunk, token in zip(chunks, ids, strict=False):
            chunk.request.num_computed_tokens += chunk.num_tokens
            if chunk.request.num_uncomputed_prefill == 0:
                chunk.request.output_ids.append(int(token))
        pending = [r for r in pending if r.num_uncomputed_prefill]
    return time.perf_counter() - start


def bench_ours(runner: Runner, batch: int, context: int, run: DecodeRun) -> dict:
    """Prefill tokens/s (unless skipped) and decode tokens/s and step times of `batch` rows."""
    requests = make_requests(runner, batch, context, run.new_tokens, run.seed)
    out = {}
    if run.skip_prefill:
        for request in requests:  # an unfilled cache of the same length: timing only
            request.num_computed_tokens = context
            request.output_ids.append(11)
    else:
        prefill_all(runner, requests, run.prefill_token_budget)  # compiles
        prefill_s = prefill_all(runner, requests, run.prefill_token_budget)
        out["prefill_tokens_per_s"] = batch * context / prefill_s
    step_s = []
    for i in range(run.new_tokens - 1):
        start = time.perf_counter()
        tokens = np.asarray(runner.step([], requests))
        if i:  # the first call compiles
            step_s.append(time.perf_counter() - start)
        for request, token in zip(requests, tokens, strict=False):
            request.num_computed_tokens += 1
            request.output_ids.append(int(token))
    out.update(
        decode_tokens_per_s=batch * len(step_s) / sum(step_s),
        decode_step_median_ms=1e3 * statistics.median(step_s),
        decode_step_min_ms=1e3 * min(step_s),
        decode_step_max_ms=1e3 * max(step_s),
    )
    return out


def load_hf(model_path: Path) -> Any:
    """transformers' model for the same checkpoint (torch, float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    directory = model_path.parent if model_path.suffix == ".gguf" else model_path
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def bench_hf(model: Any, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    """HF `generate`'s prefill and decode tokens/s on the same shapes (greedy, forced length),
    and its end-to-end rate (all `new_tokens` of the batch over the whole call: what a served
    burst of the same shape compares to). One untimed call first: torch's first call of a
    shape pays one-time costs (measured 1.5 s of 15.9 at batch 32), which made the first
    timed call, the prefill, look 1.5x slower than it is."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(seed).integers(10, vocab, (batch, prompt_len)))

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - start

    run(2)
    first_s = run(1)
    total_s = run(new_tokens)
    return {
        "prefill_tokens_per_s": batch * prompt_len / first_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / max(total_s - first_s, 1e-9),
        "generate_tokens_per_s": batch * new_tokens / total_s,
    }


def random_weights(
    shape: str, dtype: str, quantization: str | None, seed: int = 0
) -> tuple[ModelConfig, Weights]:
    """(config, weights) of random weights of a named shape, quantized if asked."""
    cfg = dataclasses.replace(SHAPES[shape], dtype=dtype)
    weights = init_random(cfg, jax.random.key(seed))
    if quantization:
        one_device = NamedSharding(make_mesh(1, cfg), PartitionSpec())
        weights = quant.quantize(weights, quantization, one_device)
    return cfg, weights


def build(
    args: argparse.Namespace, batches: list[int], contexts: list[int]
) -> tuple[Runner, Path | None]:
    """(runner, HF model path or None) for `--shape` or `--model`, sized for the largest run."""
    max_len = max(contexts) + args.new_tokens
    config = EngineConfig(
        max_batch_size=max(batches),
        prefill_token_budget=max(args.prefill_token_budget, 32),
        max_model_len=max_len,
        attention_backend=args.attention_backend,
    )
    num_pages = 1 + max(batches) * -(-max_len // config.page_size)
    if args.shape:
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        cfg, weights = random_weights(args.shape, dtype, args.quantization, args.seed)
        return make_runner(cfg, weights, config, num_pages=num_pages, max_model_len=max_len), None
    model, runner = load_runner(
        args.model,
        config,
        dtype=args.dtype,
        quantization=args.quantization,
        num_pages=num_pages,
        max_model_len=max_len,
    )
    return runner, model.source


def measure(
    runner: Runner,
    floors: Floors,
    args: argparse.Namespace,
    batches: list[int],
    contexts: list[int],
) -> list[dict[str, Any]]:
    """Our figures and their floors, one row per (context, batch)."""
    cfg = runner.cfg
    run = DecodeRun(
        new_tokens=args.new_tokens,
        prefill_token_budget=args.prefill_token_budget,
        skip_prefill=args.skip_prefill,
        seed=args.seed,
    )
    rows = []
    for context in contexts:
        for batch in batches:
            print(f"ours: batch {batch}, context {context}", file=sys.stderr, flush=True)
            row = {
                "batch": batch,
                "context": context,
                "ours": bench_ours(runner, batch, context, run),
            }
            mean_context = context + args.new_tokens // 2
            row["floor"] = {
                "decode_step_ms": 1e3 * floors.decode_step_s(cfg, batch, mean_context),
                "decode_read_ms": 1e3 * floors.decode_read_s(cfg, batch, mean_context),
                "prefill_tokens_per_s": floors.prefill_tokens_per_s(cfg, context),
            }
            rows.append(row)
            ours = row["ours"]
            print(
                f"  decode step {ours['decode_step_median_ms']:.2f} ms "
                f"(read floor {row['floor']['decode_read_ms']:.2f} ms)",
                file=sys.stderr,
                flush=True,
            )
    return rows


def format_rows(rows: list[dict[str, Any]], floors: Floors, cfg: ModelConfig) -> str:
    nan = float("nan")
    lines = [
        f"\n{'batch':>5} {'ctx':>5} {'prefill tok/s':>13} {'(floor)':>8} {'HF':>6}"
        f" {'decode tok/s':>12} {'HF':>7} {'step ms':>8} {'(floor)':>8} {'x floor':>7}"
        f" {'HF generate tok/s':>17}"
    ]
    for row in rows:
        ours, hf, floor = row["ours"], row.get("hf", {}), row["floor"]
        lines.append(
            f"{row['batch']:>5} {row['context']:>5} {ours.get('prefill_tokens_per_s', nan):>13.0f}"
            f" {floor['prefill_tokens_per_s']:>8.0f} {hf.get('prefill_tokens_per_s', nan):>6.0f}"
            f" {ours['decode_tokens_per_s']:>12.1f} {hf.get('decode_tokens_per_s', nan):>7.1f}"
            f" {ours['decode_step_median_ms']:>8.1f} {floor['decode_step_ms']:>8.1f}"
            f" {ours['decode_step_median_ms'] / floor['decode_step_ms']:>7.2f}"
            f" {hf.get('generate_tokens_per_s', nan):>17.1f}"
        )
    lines.append(
        f"floors from {floors.weight_bytes / 1e6:.0f} MB of weights, {floors.bandwidth / 1e9:.1f}"
        f" GB/s measured read bandwidth, {floors.flops / 1e12:.2f} TFLOP/s measured {cfg.dtype}"
        " matmul rate"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench engine", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, else bfloat16")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--contexts", default="128", help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-token-budget", type=int, default=512)
    parser.add_argument("--attention-backend", default="auto", choices=BACKEND_NAMES)
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    parser.add_argument("--skip-prefill", action="store_true", help="decode over an unfilled cache")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_engine"))
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="then run ours again under jax.profiler and write its trace here (for TensorBoard "
        "or `python -m tfjax.bench.trace_kernels`)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in MODES:
        return importlib.import_module(MODES[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    keep_freed_memory(args.quantization, args.dtype)  # before jax's backend starts, as serve
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    enable_compilation_cache(default_cache_dir())
    runner, hf_path = build(args, batches, contexts)
    cfg, weight_bytes = runner.cfg, num_bytes(runner.weights)
    floors = Floors(read_bandwidth_bytes_per_s(), matmul_flops_per_s(cfg.dtype), weight_bytes)
    rows = measure(runner, floors, args, batches, contexts)
    if args.profile:  # a second pass, everything compiled: the trace holds only the steps
        with jax.profiler.trace(args.profile):
            measure(runner, floors, args, batches, contexts)
    if not (args.no_hf or hf_path is None):
        del runner  # HF runs alone
        hf_model = load_hf(hf_path)
        for row in rows:
            print(f"HF: batch {row['batch']}, context {row['context']}", file=sys.stderr)
            row["hf"] = bench_hf(hf_model, row["batch"], row["context"], args.new_tokens, args.seed)
    print(format_rows(rows, floors, cfg))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "model": args.shape or args.model,
        "dtype": cfg.dtype,
        "attention_backend": backend_for(args.attention_backend).name,
        "quantization": args.quantization,
        "new_tokens": args.new_tokens,
        "weight_bytes": floors.weight_bytes,
        "read_bandwidth_bytes_per_s": floors.bandwidth,
        "matmul_flops_per_s": floors.flops,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_engine.json'}", file=sys.stderr)
    return 0
