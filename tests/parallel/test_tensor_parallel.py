"""Tensor parallelism on 4 fake CPU devices (subprocesses: the device count is fixed when JAX
starts): TP 2/4 logits and greedy outputs equal single-device for Llama and Qwen2, preemption
through the host tier under TP, and `tfjax serve --tensor-parallel 2` streaming."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT)}


def test_tensor_parallel_matches_single_device() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel.tp_checks"],
        cwd=ROOT,
        env=dict(os.environ, **FOUR_DEVICES),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("greedy tokens equal") == 4


def test_server_with_tensor_parallel_two_streams(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    env = dict(os.environ, TFJAX_CACHE_DIR=str(tmp_path), **FOUR_DEVICES)
    args = [
        sys.executable,
        "-m",
        "serving.cli",
        "serve",
        "--model",
        str(tiny_llama3_dir),
        "--port",
        "0",
        "--tensor-parallel",
        "2",
        "--max-batch-size",
        "2",
        "--max-model-len",
        "64",
        "--kv-pages",
        "32",
        "--prefill-token-budget",
        "32",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        match = re.search(r"on (http://\S+)", proc.stdout.readline())
        assert match, f"server did not start (exit {proc.poll()})"
        body = {
            "prompt": "hello",
            "max_tokens": 5,
            "stream": True,
            "ignore_eos": True,
            "model": Path(tiny_llama3_dir).name,
        }
        with httpx.stream("POST", f"{match.group(1)}/v1/completions", json=body, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert sum('"text"' in e for e in events) >= 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
