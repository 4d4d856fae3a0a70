"""`tfjax calibrate`: measure this machine with the real runner, write a simulator profile.

    tfjax calibrate --model M [engine flags] --out PROFILE.json

Builds the runner `tfjax serve` would run with the same flags (compiling only the step
shapes it measures, not every bucket as serve's warm-up does), then times
decode steps by batch size and context length, prefill steps by chunk size and the host
links both ways (`tfjax.sim.calibrate`). Progress goes to stderr. The profile is what
`tfjax simulate --profile PROFILE.json` loads; its engine flags are the ones given here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tfjax.config import add_engine_arguments  # lazily, as serve_cmd: it imports JAX

    parser = subparsers.add_parser(
        "calibrate", help="measure this machine into a cost profile for tfjax simulate"
    )
    parser.add_argument("--model", default="default", help='"default", a HF dir or a .gguf file')
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument("--out", required=True, type=Path, help="profile JSON file")
    parser.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    add_engine_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from tfjax.assembly import MAX_OFFLOAD_BYTES_IN_FLIGHT
    from tfjax.async_engine import build_runner
    from tfjax.kv.transfer import Transfers
    from tfjax.sim.calibrate import calibrate
    from tfjax.sim.profiles import profile_to_json

    def progress(line: str) -> None:
        print(f"calibrate: {line}", file=sys.stderr, flush=True)

    # No warm-up: each measured shape compiles in its untimed first run, the rest never.
    _, config, runner = build_runner(args, warmup=False)
    links = Transfers(runner.pages_sharding, max_bytes_in_flight=MAX_OFFLOAD_BYTES_IN_FLIGHT)
    try:
        profile = calibrate(
            runner,
            runner,
            links,
            config,
            name=args.name or args.out.stem,
            copies_share_compute=jax.default_backend() == "cpu",
            grouped_decode_reads=runner.backend.name == "cpu",
            progress=progress,
        )
    finally:
        links.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile_to_json(profile), indent=1))
    progress(f"wrote {args.out}")
    return 0
