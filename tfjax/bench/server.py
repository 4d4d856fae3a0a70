"""Server lifecycle for the benchmarks that bring their own servers (`compare`, `sim`,
`mixed-lengths`): start, wait until ready, stop.

`tfjax_server` runs `tfjax serve` on 127.0.0.1 with port 0 and reads the URL from its ready
line; `command_server` runs any command (vLLM, another tfjax build) that serves at a given URL
and polls its `/health` until it answers 200. Stdout is read on a thread (it must never fill
its pipe), stderr goes to a log file. On exit: SIGTERM, wait, and kill only if it does not stop,
so a benchmark never leaves a server behind.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tfjax.bench.client import served_model

READY = re.compile(r"tfjax serving (?P<model>.+) on (?P<url>http://\S+)")
REPO = Path(__file__).resolve().parents[2]  # `python -m serving.cli` runs this checkout's code
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Server:
    base_url: str
    model: str
    pid: int  # of the server process (a soak reads its RSS and open files)


def tfjax_serve_command(policy: str | None, flags: Sequence[str]) -> list[str]:
    """`tfjax serve` of this checkout on a free loopback port (`policy` None: its default)."""
    serve = ["serve", "--host", "127.0.0.1", "--port", "0"]
    if policy is not None:
        serve += ["--policy", policy]
    return [sys.executable, "-m", "serving.cli", *serve, *flags]


@contextmanager
def tfjax_server(
    policy: str | None, flags: Sequence[str], log_path: Path, start_timeout_s: float
) -> Iterator[Server]:
    """`tfjax serve [--policy POLICY] FLAGS` until the block ends."""
    with _running(tfjax_serve_command(policy, flags), log_path) as (proc, lines):
        yield _wait_ready_line(proc, lines, start_timeout_s, log_path)


@contextmanager
def command_server(
    command: str, base_url: str, log_path: Path, start_timeout_s: float
) -> Iterator[Server]:
    """Any server command (a shell-quoted string) that serves at `base_url`."""
    base_url = base_url.rstrip("/")
    with _running(shlex.split(command), log_path) as (proc, _):
        _wait_healthy(proc, base_url, start_timeout_s, log_path)
        yield Server(base_url=base_url, model=served_model(base_url), pid=proc.pid)


@contextmanager
def _running(
    cmd: list[str], log_path: Path
) -> Iterator[tuple[subprocess.Popen, queue.Queue[str | None]]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        print(f"$ {shlex.join(cmd)}", file=log, flush=True)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
        try:
            yield proc, lines
        finally:
            stop(proc)


def _pump(proc: subprocess.Popen, lines: queue.Queue[str | None]) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _wait_ready_line(
    proc: subprocess.Popen, lines: queue.Queue[str | None], timeout_s: float, log_path: Path
) -> Server:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if line is None:
            break
        if match := READY.search(line):
            url, model = match.group("url"), match.group("model")
            return Server(base_url=url, model=model, pid=proc.pid)
    raise RuntimeError(f"server not ready (exit code {proc.poll()}); see {log_path}")


def _wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base_url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy (exit code {proc.poll()}); see {log_path}")


def stop(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if it has not stopped after `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
