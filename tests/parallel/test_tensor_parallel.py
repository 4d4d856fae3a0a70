"""Tensor parallelism on 4 fake CPU devices (subprocesses: the device count is fixed when JAX
starts): TP 2/4 logits and greedy outputs equal single-device for Llama and Qwen2, preemption
through the host tier under TP, and `tfjax serve --tensor-parallel 2` streaming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.serving.live import live_server

ROOT = Path(__file__).resolve().parents[2]
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def test_tensor_parallel_matches_single_device() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel.tp_checks"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **FOUR_DEVICES),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("greedy tokens equal") == 4


def test_server_with_tensor_parallel_two_streams(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    args = [
        "--model", str(tiny_llama3_dir), "--tensor-parallel", "2", "--max-batch-size", "2",
        "--max-model-len", "64", "--kv-pages", "32", "--prefill-token-budget", "32",
    ]  # fmt: skip
    with live_server(args, tmp_path, FOUR_DEVICES) as (proc, url):
        body = {
            "prompt": "hello",
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "model": Path(tiny_llama3_dir).name,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
