"""`tfjax.bench.server`: a server started for a benchmark is ready when the benchmark starts and
gone when it ends. The servers here are `tests.serving.fake_serve`: the real `tfjax serve`
command (flags, ready line, /health, SIGTERM draining) on a fake engine, so they start in
seconds."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import httpx
import pytest

from serving.cli import main as tfjax
from tfjax.bench import server

FAKE_SERVE = [sys.executable, "-m", "tests.serving.fake_serve", "serve"]


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_tfjax_server_reads_the_ready_line_and_stops_the_server(tmp_path, monkeypatch) -> None:
    def fake_command(policy: str | None, flags: list[str]) -> list[str]:
        return [*FAKE_SERVE, "--host", "127.0.0.1", "--port", "0", "--policy", policy, *flags]

    monkeypatch.setattr(server, "tfjax_serve_command", fake_command)
    with server.tfjax_server("fcfs", [], tmp_path / "serve.log", start_timeout_s=60) as s:
        assert httpx.get(s.base_url + "/health").status_code == 200
        argv = ["bench", "serve", "--base-url", s.base_url, "--num-prompts", "3"]
        argv += ["--random-output-len", "4", "--prompt-mode", "text", "--disable-tqdm"]
        assert tfjax(argv) == 0
        pid = s.pid
    assert _gone(pid)
    assert "fake engine shut down" in (tmp_path / "serve.log").read_text()  # SIGTERM, drained


def test_command_server_waits_for_health(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = " ".join([*FAKE_SERVE, "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    with server.command_server(command, url, tmp_path / "cmd.log", start_timeout_s=60) as s:
        assert s.base_url == url and s.model  # from /v1/models
        assert httpx.get(url + "/health").status_code == 200
        pid = s.pid
    assert _gone(pid)


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "bad.log"
    dead = server.command_server("false", "http://127.0.0.1:9", log, start_timeout_s=10)
    with pytest.raises(RuntimeError, match="not healthy"), dead:
        pass
