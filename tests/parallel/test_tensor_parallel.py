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


def run_on_four_devices(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, in a JAX that starts with 4 fake CPU devices;
    fails the test with the output's tail if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **FOUR_DEVICES),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result


def test_tensor_parallel_matches_single_device() -> None:
    result = run_on_four_devices(["-m", "tests.parallel.tp_checks"], timeout_s=600)
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


SHARD_CHECK = """
import sys
from pathlib import Path

import jax
import numpy as np

from models.loaders import safetensors as safetensors_loader
from models.sharding import placement

path = Path(sys.argv[1])
cfg, whole = safetensors_loader.load(path, dtype="float32")
sharded = safetensors_loader.load_sharded(path, cfg, placement(cfg, 2))
leaves = jax.tree.leaves(sharded)
for host, array in zip(jax.tree.leaves(whole), leaves, strict=True):
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
wq = sharded.layers[0].wq
assert wq.addressable_shards[0].data.shape[1] == wq.shape[1] // 2, "wq is not split"
print(f"{len(leaves)} weights, every device's shard equal")
"""


def test_each_device_reads_its_slice_of_a_checkpoint(tiny_qwen2_dir: Path) -> None:
    """`load_sharded` over TP 2 (q/k/v biases split too): every device's shard of every weight
    equals that slice of the whole tensor."""
    result = run_on_four_devices(["-c", SHARD_CHECK, str(tiny_qwen2_dir)], timeout_s=300)
    assert "every device's shard equal" in result.stdout
