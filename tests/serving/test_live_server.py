"""A live `tfjax serve` subprocess on a tiny random checkpoint, driven over loopback by the
official `openai` client and by raw HTTP: streaming with a consumption rate, disconnects that
must free pages, and a clean SIGTERM exit."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving.live import live_server


@pytest.fixture(scope="module")
def server(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    args = [
        "--model", str(tiny_llama3_dir), "--policy", "tokenflow", "--max-batch-size", "4",
        "--max-model-len", "128", "--kv-pages", "64", "--prefill-token-budget", "64",
        "--served-model-name", "tiny",
    ]  # fmt: skip
    with live_server(args, tmp_path_factory.mktemp("cache")) as (proc, url):
        yield {"proc": proc, "url": url}


def device_pages_used(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(r'tfjax_kv_pages_used\{tier="device"\} (\S+)', text)
    assert match, "no device page gauge in /metrics"
    return float(match.group(1))


def test_openai_client_streams_chat_with_consumption_rate(server: dict) -> None:
    client = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"consumption_rate": 12, "ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_completion_with_seed_is_reproducible(server: dict) -> None:
    body = {
        "model": "tiny",
        "prompt": "the quick brown fox",
        "max_tokens": 6,
        "temperature": 0.8,
        "seed": 42,
        "ignore_eos": True,
    }
    first = httpx.post(f"{server['url']}/v1/completions", json=body, timeout=60).json()
    second = httpx.post(f"{server['url']}/v1/completions", json=body, timeout=60).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["usage"]["completion_tokens"] == 6


def test_disconnect_mid_stream_frees_pages(server: dict) -> None:
    body = {
        "model": "tiny",
        "prompt": "hello",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
        "consumption_rate": 5,
    }
    with httpx.stream("POST", f"{server['url']}/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived: the request holds pages now
    deadline = time.monotonic() + 10
    while device_pages_used(server["url"]) > 0:
        assert time.monotonic() < deadline, "pages still held after the client left"
        time.sleep(0.1)


def test_sigterm_exits_cleanly(server: dict) -> None:
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
