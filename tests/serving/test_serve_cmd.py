"""`tfjax serve` as a process (`tests.serving.fake_serve`: the engine is a `FakeEngine`): the
ready line, serving over real HTTP, /health through start-up and draining, SIGTERM draining a
live stream, stopping the engine, exiting 0, and the API key over TLS."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
FAKE_SERVE = [sys.executable, "-m", "tests.serving.fake_serve", "serve"]


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, "no ready line: " + (proc.poll() is not None and proc.stderr.read() or "")
    return proc.stdout.readline()


def test_serve_ready_line_and_sigterm() -> None:
    cmd = [*FAKE_SERVE, "--port", "0", "--served-model-name", "m"]
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_answer(url: str, timeout_s: float) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"nothing answered at {url}"
            time.sleep(0.05)


def test_health_is_503_while_starting_and_while_draining() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*FAKE_SERVE, "--port", str(port), "--served-model-name", "m"]
    cmd += ["--shutdown-grace-s", "1.5", "--log-level", "warning"]
    env = dict(os.environ, FAKE_BUILD_S="2")
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        starting = _wait_for_answer(f"{url}/health", timeout_s=60)
        assert (starting.status_code, starting.json()) == (503, {"status": "starting"})
        models = httpx.get(f"{url}/v1/models")
        assert models.status_code == 503 and models.json()["error"]["type"]
        assert re.fullmatch(rf"tfjax serving m on {url}\n", _read_line(proc, timeout_s=60))
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert [card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]] == ["m"]

        streamed: list[str] = []
        body = {"model": "m", "prompt": "hi", "max_tokens": 10_000, "stream": True}

        def read_stream() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as r:
                streamed.extend(line for line in r.iter_lines() if line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        draining = httpx.get(f"{url}/health")
        assert (draining.status_code, draining.json()) == (503, {"status": "draining"})
        refused = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x"})
        assert refused.status_code == 503
        reader.join(15)
        assert streamed[-1] == "data: [DONE]" and "aborted" in streamed[-2]
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_api_key_from_the_environment_over_tls_is_never_logged(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    api_key = "sk-never-log-me-42"
    cmd = [*FAKE_SERVE, "--port", "0", "--served-model-name", "m"]
    cmd += ["--log-level", "debug", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    env = dict(os.environ, TFJAX_API_KEY=api_key)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        match = re.fullmatch(
            r"tfjax serving m on (https://127\.0\.0\.1:\d+)\n", _read_line(proc, 60)
        )
        assert match
        with httpx.Client(
            base_url=match.group(1), verify=ssl.create_default_context(cafile=cert), timeout=10
        ) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/metrics").status_code == 200
            body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
            assert client.post("/v1/completions", json=body).status_code == 401
            wrong = {"Authorization": f"Bearer {api_key[:-1]}"}
            assert client.post("/v1/completions", json=body, headers=wrong).status_code == 401
            right = {"Authorization": f"Bearer {api_key}"}
            answer = client.post("/v1/completions", json=body, headers=right)
            assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "finish=length" in err and "uvicorn" in err, err  # library lines were on too
        assert api_key not in out + err and api_key[:-1] not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_while_the_engine_builds_exits_at_once() -> None:
    port = _free_port()
    cmd = [*FAKE_SERVE, "--port", str(port), "--log-level", "warning"]
    env = dict(os.environ, FAKE_BUILD_S="60")
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert _wait_for_answer(f"http://127.0.0.1:{port}/health", 60).status_code == 503
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 5  # it did not wait for the 60 s build
        assert proc.stdout.read() == ""  # never ready, so no ready line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
