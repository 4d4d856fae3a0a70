"""`tfjax serve` over two processes on loopback (`tfjax.distributed`), each with 2 CPU
devices and one random Llama with 4 KV heads split over all 4: greedy text equals a
single-process server's, with a streamed request and an abort in the run, and once the second
process is killed, process 0 fails the stream in flight, answers /health 503 and exits with
WORKER_LOST_EXIT_CODE within a bound, whether it died or hangs; SIGTERM on process 0 stops
both with 0. Slow: every server compiles its step buckets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_COMMON, _save_tiny_model, _save_tiny_tokenizer
from tests.serving.live import READY, ROOT, live_server
from tfjax.distributed import WORKER_LOST_EXIT_CODE

pytestmark = pytest.mark.slow

ENGINE_ARGS = [
    "--max-batch-size", "2", "--max-model-len", "64", "--kv-pages", "32",
    "--prefill-token-budget", "32", "--no-prefix-cache",
]  # fmt: skip
PROMPTS = ["hello world", "the quick brown fox"]
MAX_TOKENS = 8
WORKER_TIMEOUT_S = 4.0
START_TIMEOUT_S = 900.0  # two processes compiling on a busy 2-core machine
LOST_BOUND_S = 30.0  # kill -> exit, with WORKER_TIMEOUT_S of it spent waiting for heartbeats


@pytest.fixture(scope="module")
def llama_4kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama with 4 heads and 4 KV heads: splits evenly over 4 devices."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("llama-4kv")
    config = LlamaConfig(
        **{**TINY_COMMON, "num_key_value_heads": 4},
        vocab_size=_save_tiny_tokenizer(directory),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_tiny_model(directory, config, max_shard_size="10GB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(url: str, model: str, prompt: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(
        f"{url}/v1/completions", json={**body, "ignore_eos": True, **extra}, timeout=60
    )


def greedy_text(url: str, model: str, prompt: str) -> str:
    response = complete(url, model, prompt)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def stream_events(url: str, model: str, prompt: str, max_tokens: int) -> Iterator[dict | str]:
    """The SSE data of a streamed greedy completion, parsed; "[DONE]" last."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    body |= {"stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                yield data if data == "[DONE]" else json.loads(data)


def streamed_text(url: str, model: str, prompt: str) -> str:
    events = list(stream_events(url, model, prompt, MAX_TOKENS))
    assert events[-1] == "[DONE]"
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def abort_after_first_token(url: str, model: str, prompt: str) -> None:
    events = stream_events(url, model, prompt, max_tokens=40)
    next(events)
    events.close()  # the client goes away: the server aborts the request


@contextmanager
def two_process_server(
    model_dir: Path, cache_dir: Path
) -> Iterator[tuple[list[subprocess.Popen], str]]:
    """Process 0 (HTTP on a free port) and process 1, both killed on exit if still alive."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ, TFJAX_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT), JAX_NUM_CPU_DEVICES="2"
    )
    common = [
        sys.executable, "-m", "serving.cli", "serve", "--model", str(model_dir),
        "--tensor-parallel", "4", *ENGINE_ARGS, "--coordinator-address", coordinator,
        "--num-processes", "2", "--worker-timeout-s", str(WORKER_TIMEOUT_S),
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as logs:
        try:
            for process_id in (0, 1):
                args = [*common, "--process-id", str(process_id)]
                if process_id == 0:
                    args += ["--port", "0"]
                log = logs.enter_context(open(cache_dir / f"process-{process_id}.log", "w"))
                procs.append(
                    subprocess.Popen(
                        args, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT
                    )
                )
            yield procs, _ready_url(procs[0], cache_dir)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _ready_url(proc: subprocess.Popen, cache_dir: Path) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    match = READY.search(lines[0]) if lines else None
    log = (cache_dir / "process-0.log").read_text()[-3000:]
    assert match, f"no ready line, got {lines} (exit {proc.poll()}); stderr:\n{log}"
    return match.group(2)


@pytest.fixture(scope="module")
def reference(llama_4kv_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Greedy text of each prompt from a single-process server (one device)."""
    cache_dir = tmp_path_factory.mktemp("one-process")
    with live_server(["--model", str(llama_4kv_dir), *ENGINE_ARGS], cache_dir) as (proc, url):
        texts = {p: greedy_text(url, llama_4kv_dir.name, p) for p in PROMPTS}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    return texts


@pytest.mark.parametrize("failure", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_two_processes_serve_like_one_and_fail_fast_when_one_dies(
    llama_4kv_dir: Path, reference: dict[str, str], tmp_path: Path, failure: signal.Signals
) -> None:
    """A killed worker breaks the step in flight at once (gloo sees the closed connection);
    a stopped one leaves it blocked in a collective until the watchdog ends the stream."""
    model = llama_4kv_dir.name
    with two_process_server(llama_4kv_dir, tmp_path) as ((leader, worker), url):
        with ThreadPoolExecutor(3) as pool:
            plain = pool.submit(greedy_text, url, model, PROMPTS[0])
            streamed = pool.submit(streamed_text, url, model, PROMPTS[1])
            aborted = pool.submit(abort_after_first_token, url, model, PROMPTS[0])
            assert plain.result() == reference[PROMPTS[0]]
            assert streamed.result() == reference[PROMPTS[1]]
            aborted.result()
        assert greedy_text(url, model, PROMPTS[1]) == reference[PROMPTS[1]]  # still in step

        in_flight = stream_events(url, model, PROMPTS[0], max_tokens=50)
        next(in_flight)
        worker.send_signal(failure)
        failed = time.monotonic()
        rest = list(in_flight)
        assert rest[-1] == "[DONE]"
        assert any("error" in event for event in rest[:-1]), rest
        health = []
        while leader.poll() is None and time.monotonic() - failed < LOST_BOUND_S:
            with contextlib.suppress(httpx.TransportError):  # the process is exiting
                health.append(httpx.get(f"{url}/health", timeout=1).status_code)
            time.sleep(0.1)
        assert leader.wait(timeout=1) == WORKER_LOST_EXIT_CODE
        assert time.monotonic() - failed < LOST_BOUND_S
        assert 503 in health


def test_sigterm_on_process_zero_stops_every_process(llama_4kv_dir: Path, tmp_path: Path) -> None:
    with two_process_server(llama_4kv_dir, tmp_path) as ((leader, worker), url):
        greedy_text(url, llama_4kv_dir.name, PROMPTS[0])  # steps ran before the stop
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(timeout=60) == 0
        assert worker.wait(timeout=60) == 0
