"""`tfjax bench engine xla-cpu`: XLA:CPU's options for small matrix products, measured on the
engine's own step shapes.

    tfjax bench engine xla-cpu --out out/bench_xla_cpu [--shape smollm2-135m]
        [--batches 1,8,32] [--context 128] [--rounds 3] [--quantization int8] [--dtype bfloat16]
    tfjax bench engine xla-cpu --list      # the variants this jaxlib supports, no runs

Each variant is a set of XLA_FLAGS (XLA reads them once per process), so every measurement is
a child process of this command: it builds a `Runner` on random weights of `--shape`, prefills
`max(batches)` prompts of `--context` tokens through the real prefill buckets, then times
decode steps at each batch size (`tfjax.bench.engine.bench_ours`). Variants run in alternating
order, `--rounds` times, and each figure is the median over rounds, so that a slow spell of a busy
machine does not land on one variant. Run it on an idle machine: numbers taken beside other
work mean nothing.

Variants are built only from flags present in the installed jaxlib (their names are read out
of libjax_common.so, where XLA's flag table lives), since XLA aborts on an unknown flag. A
variant XLA rejects anyway shows up as failed with its error's last line. The persistent
compilation cache stays off in the children: a variant must compile its own code.

Writes DIR/bench_xla_cpu.json and prints one table: decode step ms per batch and prefill
tokens/s per variant, each against the baseline (no flags), and which library fusions the
decode step compiled to (`__ynn_fusion x211`, `__onednn_fusion x...`; "none" means XLA's own
emitters and Eigen), so a flag that changed nothing is visible as such. Found on jax 0.10.2:
dots already go to YNNPACK by default; `xnn-dot` compiled to no XNNPACK fusion in a small check;
`onednn-dot` fails on SmolLM2's step with oneDNN's "partition compile failed".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from tfjax.bench.flags import HelpFormatter
from tfjax.bench.server import REPO

# name -> (flags, the flag names it needs); the baseline is the installed jax's defaults.
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),  # jax 0.10's default: dots (only) as YNNPACK fusions
    "eigen-dot": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "ynn-dot+eltwise+reduce": ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",),
    "onednn-dot": (
        "--xla_cpu_use_onednn=true",
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_cpu_experimental_onednn_fusion_type=dot",
    ),
    "onednn-dot+eltwise": (
        "--xla_cpu_use_onednn=true",
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    ),
    "xnn-dot": (
        "--xla_cpu_use_xnnpack=true",
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_cpu_experimental_xnn_fusion_type=dot",
    ),
    "fast-math": ("--xla_cpu_enable_fast_math=true",),
    "vector-width-512": ("--xla_cpu_prefer_vector_width=512",),
    "no-fusion-emitters": ("--xla_cpu_use_fusion_emitters=false",),
}
LIBRARY_FUSION = re.compile(r'"kind":"(__\w+_fusion)"')


def installed_flag_names() -> set[str]:
    """Every `xla_cpu_*` name in the installed XLA's flag table."""
    import jaxlib

    library = Path(jaxlib.__file__).parent / "libjax_common.so"
    return {name.decode() for name in re.findall(rb"xla_cpu_[a-z0-9_]+", library.read_bytes())}


def supported_variants() -> dict[str, tuple[str, ...]]:
    names = installed_flag_names()
    return {
        variant: flags
        for variant, flags in VARIANTS.items()
        if all(flag[2:].split("=")[0] in names for flag in flags)
    }


def child(args: argparse.Namespace) -> int:
    """One variant's measurements (XLA_FLAGS already set by the parent), as one JSON line."""
    from tfjax.bench.engine import DecodeRun, bench_ours, random_weights
    from tfjax.config import EngineConfig
    from tfjax.runner_setup import make_runner

    batches = [int(b) for b in args.batches.split(",")]
    cfg, weights = random_weights(args.shape, args.dtype, args.quantization)
    max_len = args.context + args.new_tokens
    config = EngineConfig(
        max_batch_size=max(batches), prefill_token_budget=512, max_model_len=max_len
    )
    pages = 1 + max(batches) * -(-max_len // config.page_size)
    runner = make_runner(cfg, weights, config, num_pages=pages, max_model_len=max_len)
    run = DecodeRun(new_tokens=args.new_tokens)
    rows = {str(b): bench_ours(runner, b, args.context, run) for b in batches}
    print(json.dumps({"rows": rows, "library_fusions": _library_fusions(runner, max(batches))}))
    return 0


def _library_fusions(runner, batch: int) -> dict[str, int]:
    """How many products of a decode step of `batch` rows each library runs, from the
    optimized HLO: shows whether a variant's flags took effect at all."""
    from collections import Counter

    from tfjax.config import Bucket
    from tfjax.executables import _forward_logits

    step, _, _, last = runner.host_inputs(Bucket(0, batch), [], [])
    compiled = _forward_logits.lower(
        runner.weights, runner.kv, step, last, cfg=runner.cfg, backend=runner.backend
    ).compile()
    return dict(Counter(LIBRARY_FUSION.findall(compiled.as_text())))


def run_variant(flags: tuple[str, ...], args: argparse.Namespace) -> dict:
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "serving.cli", "bench", "engine", "xla-cpu", "--child"]
    command += ["--shape", args.shape, "--dtype", args.dtype]
    command += ["--batches", args.batches, "--context", str(args.context)]
    command += ["--new-tokens", str(args.new_tokens)]
    if args.quantization:
        command += ["--quantization", args.quantization]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tfjax bench engine xla-cpu", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--quantization", default=None, choices=("int8", "fp8", "w8a8"))
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--list", action="store_true", help="print the supported variants")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("out/bench_xla_cpu"))
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    variants = supported_variants()
    if args.variants:
        variants = {name: variants[name] for name in args.variants.split(",")}
    if args.list:
        for name, flags in variants.items():
            print(f"{name:24} {' '.join(flags) or '(jax defaults)'}")
        return 0

    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            print(f"round {round_index + 1}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_variant(variants[name], args))
    table = {name: _medians(results) for name, results in runs.items()}
    _print_table(table, [b for b in args.batches.split(",")])
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": variants}
    out |= {"medians": table, "runs": runs}
    (args.out / "bench_xla_cpu.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out / 'bench_xla_cpu.json'}", file=sys.stderr)
    return 0


def _medians(results: list[dict]) -> dict:
    """Per batch: median decode step ms and prefill tokens/s over the successful rounds."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"]}
    medians = {
        batch: {
            key: statistics.median(r["rows"][batch][key] for r in ok)
            for key in ("decode_step_median_ms", "prefill_tokens_per_s")
        }
        for batch in ok[0]["rows"]
    }
    return medians | {"library_fusions": ok[0]["library_fusions"]}


def _print_table(table: dict, batches: list[str]) -> None:
    base = table.get("baseline", {})
    header = " ".join(f"{'b' + b + ' step ms':>14}" for b in batches)
    print(f"\n{'variant':24} {header} {'prefill tok/s':>14}  (x baseline)")
    for name, row in table.items():
        if "error" in row:
            print(f"{name:24} failed: {row['error']}")
            continue
        cells = []
        for b in batches:
            ms = row[b]["decode_step_median_ms"]
            ratio = ms / base[b]["decode_step_median_ms"] if b in base else float("nan")
            cells.append(f"{ms:>7.1f} ({ratio:.2f})")
        prefill = row[batches[-1]]["prefill_tokens_per_s"]
        fusions = ", ".join(f"{k} x{n}" for k, n in row["library_fusions"].items()) or "none"
        print(f"{name:24} {' '.join(f'{c:>14}' for c in cells)} {prefill:>14.0f}  {fusions}")
