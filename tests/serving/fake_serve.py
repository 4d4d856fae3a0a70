"""`tfjax serve` with `build_engine` swapped for `FakeEngine`, as a process:
`python -m tests.serving.fake_serve serve [serve flags]` from the repository root.

Everything but the engine is the real command (flags, binding, ready line, signals, draining),
so process tests run in seconds. Environment knobs: `FAKE_BUILD_S` (seconds the "build"
takes, as loading and compiling would), `FAKE_TOKEN_DELAY_S` (seconds per token, default 0.02).
The engine prints "fake engine shut down" to stderr when `tfjax serve` stops it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

from tests.serving.fake_engine import FakeEngine


class _Engine(FakeEngine):
    def shutdown(self) -> None:
        print("fake engine shut down", file=sys.stderr, flush=True)


def build_engine(args: argparse.Namespace) -> FakeEngine:
    time.sleep(float(os.environ.get("FAKE_BUILD_S", "0")))
    engine = _Engine(max_model_len=100_000)
    engine.token_delay_s = float(os.environ.get("FAKE_TOKEN_DELAY_S", "0.02"))
    return engine


def main() -> int:
    sys.modules["tfjax.async_engine"] = types.SimpleNamespace(build_engine=build_engine)
    from serving import serve_cmd

    parser = argparse.ArgumentParser(prog="tfjax")
    serve_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
