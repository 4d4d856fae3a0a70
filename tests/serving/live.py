"""Start `tfjax serve` in a subprocess and wait for its one ready line (for live-server tests)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

READY = re.compile(r"tfjax serving (\S+) on (http://\S+)")
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def live_server(
    serve_args: list[str], cache_dir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Yield (process, base URL) of `tfjax serve SERVE_ARGS --port 0`; kill it on exit if alive.

    `cache_dir` keeps the test's converted weights and compiled steps out of the user's cache.
    """
    env = dict(
        os.environ, TFJAX_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT), **(extra_env or {})
    )
    args = [sys.executable, "-m", "serving.cli", "serve", "--port", "0", *serve_args]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT
    )
    try:
        line = proc.stdout.readline()
        match = READY.search(line)
        assert match, f"no ready line, got {line!r} (exit {proc.poll()})"
        yield proc, match.group(2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
