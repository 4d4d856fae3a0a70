"""Engine microbenchmark: prefill and decode tokens/s of our runner vs HF transformers.

    python scripts/bench_engine.py --out out/bench_engine [--batches 1,8,32,64]

For each batch size b: b random prompts of `--prompt-len` tokens are prefilled (one chunk each;
prefill tokens/s) and then decoded together for `--new-tokens` steps (decode tokens/s and the
median step time). HF transformers `generate` runs the same shapes in the same process (torch,
float32, greedy, `min_new_tokens` forcing the length); its decode rate is (b * (n - 1)) / (time
of n new tokens - time of 1 new token). Also prints the batch-1 floor: weight bytes / measured
memory copy bandwidth, the time a step needs just to read every weight once.

Compare numbers from one run only: this machine is noisy. Writes DIR/bench_engine.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from models import load_model
from models.cache import default_cache_dir
from models.weights import num_bytes
from tfjax.config import EngineConfig
from tfjax.kv.pages import PageAllocator
from tfjax.request import Request, SamplingParams
from tfjax.runner import Runner, enable_compilation_cache


def copy_bandwidth_bytes_per_s(num_bytes_: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-n numpy copy rate: each copy reads and writes `num_bytes_`."""
    src = np.ones(num_bytes_ // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes_ / best


def bench_ours(runner: Runner, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    pages = PageAllocator(runner.num_pages)
    requests = []
    for i in range(batch):
        prompt = rng.integers(10, runner.cfg.vocab_size, prompt_len).tolist()
        request = Request(
            f"b{i}", prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True), 0.0, 10.0
        )
        total = prompt_len + new_tokens
        request.page_ids = pages.allocate(-(-total // runner.page_size))
        requests.append(request)
    start = time.perf_counter()
    for request in requests:
        token = runner.prefill(request, prompt_len)
        request.num_computed_tokens = prompt_len
        request.output_ids.append(int(np.asarray(token)[0]))
    prefill_s = time.perf_counter() - start
    step_s = []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        tokens = np.asarray(runner.decode(requests))
        step_s.append(time.perf_counter() - start)
        for request, token in zip(requests, tokens, strict=False):
            request.num_computed_tokens += 1
            request.output_ids.append(int(token))
    return {
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * len(step_s) / sum(step_s),
        "decode_step_median_ms": 1e3 * statistics.median(step_s),
        "decode_step_min_ms": 1e3 * min(step_s),
        "decode_step_max_ms": 1e3 * max(step_s),
    }


def load_hf(model_path: Path):
    """transformers' model for the same checkpoint (torch, float32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": model_path.name} if model_path.suffix == ".gguf" else {}
    directory = model_path.parent if model_path.suffix == ".gguf" else model_path
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()


def bench_hf(model, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
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

    first_s = run(1)
    total_s = run(new_tokens)
    return {
        "prefill_tokens_per_s": batch * prompt_len / first_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / max(total_s - first_s, 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_engine"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    enable_compilation_cache(default_cache_dir())
    model = load_model(args.model)
    max_len = args.prompt_len + args.new_tokens
    config = EngineConfig(
        max_batch_size=max(batches), prefill_token_budget=args.prompt_len, max_model_len=max_len
    )
    pages_per_request = -(-max_len // config.page_size)
    runner = Runner(
        model.config,
        model.weights,
        config,
        num_pages=1 + max(batches) * pages_per_request,
        max_model_len=max_len,
    )
    start = time.perf_counter()
    runner.warmup(lambda done, total: print(f"\rcompiling {done}/{total}", end="", file=sys.stderr))
    print(f"\ncompiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    bandwidth = copy_bandwidth_bytes_per_s()
    weight_bytes = num_bytes(model.weights)
    floor_ms = 1e3 * weight_bytes / bandwidth
    hf_model = None if args.no_hf else load_hf(model.source)
    rows = []
    for batch in batches:
        print(f"batch {batch}: ours", file=sys.stderr)
        row = {
            "batch": batch,
            "ours": bench_ours(runner, batch, args.prompt_len, args.new_tokens, args.seed),
        }
        if not args.no_hf:
            print(f"batch {batch}: HF transformers", file=sys.stderr)
            row["hf"] = bench_hf(hf_model, batch, args.prompt_len, args.new_tokens, args.seed)
        rows.append(row)

    print(
        f"\n{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms (med)':>14}"
        f" {'HF prefill':>11} {'HF decode':>10} {'decode x HF':>11}"
    )
    for row in rows:
        ours, hf = row["ours"], row.get("hf")
        ratio = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"] if hf else float("nan")
        print(
            f"{row['batch']:>5} {ours['prefill_tokens_per_s']:>14.0f} "
            f"{ours['decode_tokens_per_s']:>13.1f} {ours['decode_step_median_ms']:>14.1f} "
            f"{hf['prefill_tokens_per_s'] if hf else float('nan'):>11.0f} "
            f"{hf['decode_tokens_per_s'] if hf else float('nan'):>10.1f} {ratio:>11.1f}"
        )
    print(
        f"batch-1 floor: {weight_bytes / 1e6:.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s copy "
        f"bandwidth = {floor_ms:.1f} ms per step"
    )
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": str(jax.devices()[0]),
        "model": model.name,
        "dtype": model.config.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "batch1_floor_ms": floor_ms,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_engine.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
