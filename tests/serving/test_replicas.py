"""`scripts/serve_replicas.sh`: two `tfjax serve` replicas (`tests.serving.fake_serve`: real
command, fake engine) behind vllm-router on loopback. A burst of streamed chat completions
through the router all succeed with the text a direct request gets, both replicas serve some
(their own /metrics say so); with one replica killed mid-burst, every request sent after the
kill succeeds on the other and nothing hangs past its timeout; SIGTERM stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
ROUTER = VENV / "bin" / "vllm-router"
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 20.0  # a request the router holds longer than this counts as hung
MESSAGES = [{"role": "user", "content": "hello"}]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not ROUTER.exists(), reason="vllm-router is not installed (.[router])"),
]


def _free_port_block(size: int) -> int:
    """A port P with P..P+size-1 free right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size < 65536 and all(_is_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no free block of ports")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def replicas(
    num: int,
    serve_args: list[str],
    env: dict[str, str],
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[tuple[subprocess.Popen, int]]:
    """(the script's process, router port) once the router answers; stopped on exit. `env`
    adds to the environment (TFJAX_SERVE: the replica command, default the real one)."""
    port = _free_port_block(num + 2)
    cmd = ["bash", "scripts/serve_replicas.sh", "--replicas", str(num), "--port", str(port)]
    cmd += ["--router-policy", "round_robin", "--served-model-name", "m"]
    cmd += ["--log-level", "warning", "--shutdown-grace-s", "1", *serve_args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(os.environ, TFJAX_VENV=str(VENV), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            assert proc.poll() is None, f"serve_replicas.sh exited {proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).is_success:
                    break
            assert time.monotonic() < deadline, "the router never answered"
            time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def chat(client: httpx.AsyncClient, base: str, max_tokens: int) -> str | None:
    """The streamed answer's text, or None if the stream failed or did not end with [DONE]."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}  # greedy, and every answer max_tokens long
    text = []
    try:
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "".join(text)
                if line.startswith("data: "):
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        return None
                    text.extend(c["delta"].get("content", "") for c in event["choices"])
    except httpx.HTTPError:
        return None
    return None


def fake_replicas(token_delay_s: float) -> dict[str, str]:
    return {
        "TFJAX_SERVE": f"{sys.executable} -m tests.serving.fake_serve serve",
        "FAKE_TOKEN_DELAY_S": str(token_delay_s),
    }


def finished_requests(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        if family.name == "tfjax_requests_finished"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["finish_reason"] == "length"
    )


def replica_pid(port: int) -> int:
    """The pid of the fake replica serving on `port` (from /proc: the script does not say)."""
    wanted = f"--port\0{port}\0"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_text()
                if "tests.serving.fake_serve" in cmdline and wanted in cmdline:
                    return int(entry.name)
    raise LookupError(f"no replica on port {port}")


async def test_burst_through_the_router_and_a_replica_killed_mid_burst() -> None:
    with replicas(2, [], fake_replicas(token_delay_s=0.02)) as (proc, port):
        router = f"http://127.0.0.1:{port}"
        first, second = f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            direct = await chat(client, first, 12)
            assert direct and len(direct) == 12
            texts = await asyncio.gather(*(chat(client, router, 12) for _ in range(12)))
            assert texts == [direct] * 12
            served = [finished_requests(first), finished_requests(second)]
            assert sum(served) == 13 and min(served) >= 5  # round robin: both served

            # Long streams on both replicas, then the second dies (SIGKILL: no draining).
            start = time.monotonic()
            doomed = [asyncio.create_task(chat(client, router, 100)) for _ in range(6)]
            await asyncio.sleep(0.5)
            os.kill(replica_pid(port + 2), signal.SIGKILL)
            later = await asyncio.gather(*(chat(client, router, 12) for _ in range(12)))
            in_flight = await asyncio.gather(*doomed)
        assert later == [direct] * 12  # every request sent after the kill succeeds
        assert sum(t is not None for t in in_flight) >= 3  # those on the survivor finish
        assert time.monotonic() - start < 2 * REQUEST_TIMEOUT_S  # nothing hung
        assert proc.poll() is None  # one replica down does not stop the set


def test_sigterm_stops_the_router_and_every_replica() -> None:
    with replicas(2, [], fake_replicas(token_delay_s=0.0)) as (proc, port):
        pids = [replica_pid(port + 1), replica_pid(port + 2)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert _is_free(port) and _is_free(port + 1) and _is_free(port + 2)


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return True


@pytest.mark.slow
async def test_real_replicas_through_the_router_give_the_direct_greedy_text(
    tiny_llama3_dir: Path, tmp_path: Path
) -> None:
    """`tfjax serve` on a tiny random Llama, twice, behind the router (two compiles: minutes)."""
    args = ["--model", str(tiny_llama3_dir), "--max-batch-size", "4", "--max-model-len", "128",
            "--kv-pages", "64", "--prefill-token-budget", "64"]  # fmt: skip
    env = {"TFJAX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    with replicas(2, args, env, start_timeout_s=900) as (_, port):
        router = f"http://127.0.0.1:{port}"
        first, second = f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"
        async with httpx.AsyncClient(timeout=120) as client:
            direct = await chat(client, first, 16)
            assert direct is not None and direct == await chat(client, second, 16)
            texts = await asyncio.gather(*(chat(client, router, 16) for _ in range(6)))
        assert texts == [direct] * 6
        assert finished_requests(first) >= 3 and finished_requests(second) >= 3
