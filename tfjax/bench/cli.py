"""`tfjax bench ...`: the benchmark commands, each a module of this package with its own
`main(argv)` and flags (`tfjax bench COMMAND --help` prints what it measures and every default).

Modules are imported only when their command runs, so `tfjax serve` does not pay for JAX-heavy
benchmark imports and a benchmark's flags live beside its code. The `bench` parser hands every
argument after the command name to that module untouched (`prefix_chars` that no flag uses).
"""

from __future__ import annotations

import argparse
import importlib

DESCRIPTION = (
    "Benchmarks of tfjax, or of any OpenAI-compatible server (serve). "
    "`tfjax bench COMMAND --help` says what COMMAND measures and lists its defaults."
)
# name -> (module, what it measures): the one-line help of `tfjax bench --help`.
COMMANDS = {
    "serve": (
        "tfjax.bench.serve",
        "any OpenAI-compatible server: TTFT/TPOT/ITL/E2EL (vLLM's names), effective "
        "throughput and stall (reader model); JSON, CSV, plots",
    ),
    "compare": (
        "tfjax.bench.compare",
        "policies (or any server commands) side by side on one workload, alternating "
        "--repeat runs, median (min-max) ratios to a baseline",
    ),
    "engine": (
        "tfjax.bench.engine",
        "offline prefill and decode tokens/s of the runner vs HF transformers and the "
        "machine's bandwidth/FLOP floors",
    ),
    "sim": (
        "tfjax.bench.sim_paper",
        "the TokenFlow paper's simulated experiments (23 setups x 4 policies) on cost profiles",
    ),
    "sim-vs-live": (
        "tfjax.bench.sim_vs_live",
        "simulator fidelity: one workload file live against tfjax serve and simulated",
    ),
    "burst": (
        "tfjax.bench.burst",
        "N concurrent streams through the serving engine on random weights: TTFT, tokens/s, "
        "no stream lost, no KV page leaked",
    ),
    "prefix": (
        "tfjax.bench.prefix",
        "prefix cache: TTFT and prefill tokens for shared prefixes, chats, evicted prefixes",
    ),
    "offload": (
        "tfjax.bench.offload",
        "KV offload: swap-out/in vs recompute costs per context, burst makespans per variant",
    ),
    "mixed-lengths": (
        "tfjax.bench.mixed_lengths",
        "short streams' throughput and TTFT alone and beside one long prompt, per policy",
    ),
    "soak": (
        "tfjax.bench.soak",
        "bounded soak of a server: steady streams, bursts, hang-ups, bad requests; leak checks",
    ),
    "gpu-check": (
        "tfjax.bench.gpu_check",
        "the GPU gate: kernels and engine tokens vs reference, decode/prefill vs floors",
    ),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` on the `tfjax` console script's subcommands."""
    parser = subparsers.add_parser(
        "bench", help="benchmarks (serve, compare, engine, sim, ...)", description=DESCRIPTION
    )
    _add_commands(parser)


def main(argv: list[str] | None = None) -> int:
    """`python -m tfjax.bench COMMAND ...`: the same commands without the server's modules."""
    parser = argparse.ArgumentParser(prog="python -m tfjax.bench", description=DESCRIPTION)
    _add_commands(parser)
    args = parser.parse_args(argv)
    return args.run(args)


def _add_commands(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    for name, (_, what) in COMMANDS.items():
        sub = commands.add_parser(name, help=what, add_help=False, prefix_chars="\0")
        sub.add_argument("argv", nargs="*", help="the command's own flags (see its --help)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(COMMANDS[args.bench_command][0])
    return module.main(args.argv)
