"""`tfjax` console script: one subcommand per module (generate, serve, simulate, calibrate,
bench).

Each subcommand module exposes `add_parser(subparsers)`, which registers its flags and sets
`run=<callable(args) -> int>` as the parser default. Errors a user can fix (a missing model
file, a bad flag combination) are raised as `UserError` and printed as one line, exit code 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from models.errors import UserError
from serving import calibrate_cmd, generate_cmd, serve_cmd, simulate_cmd
from tfjax.bench import cli as bench_cli
from tfjax.host_memory import keep_freed_memory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfjax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    generate_cmd.add_parser(subparsers)
    serve_cmd.add_parser(subparsers)
    simulate_cmd.add_parser(subparsers)
    calibrate_cmd.add_parser(subparsers)
    bench_cli.add_parser(subparsers)
    args = parser.parse_args(argv)
    # Before jax starts its backend; commands without these flags leave malloc as it is.
    keep_freed_memory(getattr(args, "quantization", None), getattr(args, "dtype", None))
    try:
        return args.run(args)
    except UserError as err:
        print(f"tfjax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
