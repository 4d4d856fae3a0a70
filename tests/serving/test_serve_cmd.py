"""`tfjax serve` as a process, with `build_engine` swapped for `FakeEngine`: the ready line,
serving over real HTTP, and SIGTERM draining a live stream, stopping the engine, exiting 0."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import argparse, sys, types
from tests.serving.fake_engine import FakeEngine

class Engine(FakeEngine):
    def shutdown(self):
        print("fake engine shut down", file=sys.stderr, flush=True)

def build_engine(args):
    engine = Engine(max_model_len=100_000)
    engine.token_delay_s = 0.02
    return engine

sys.modules["tfjax.async_engine"] = types.SimpleNamespace(build_engine=build_engine)
from serving import serve_cmd

parser = argparse.ArgumentParser(prog="tfjax")
serve_cmd.add_parser(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "no ready line: " + (proc.poll() is not None and proc.stderr.read() or "")
    return proc.stdout.readline()


def test_serve_ready_line_and_sigterm() -> None:
    cmd = [sys.executable, "-c", SCRIPT, "serve", "--port", "0", "--served-model-name", "m"]
    cmd += ["--shutdown-grace-s", "0.3", "--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = _read_line(proc, timeout_s=60)
        match = re.fullmatch(r"tfjax serving m on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        url = match.group(1)
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}

        body = {"model": "m", "prompt": "hi", "max_tokens": 10_000, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
            assert r.status_code == 200
            for data in r.iter_lines():
                if not data:
                    continue
                events.append(data.removeprefix("data: "))
                if len(events) == 3:
                    proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "aborted"

        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == ""  # the ready line was the only one
        assert "fake engine shut down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
