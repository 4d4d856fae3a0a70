"""The Pallas attention kernels per KV-head shard (`shard_map`) at TP 2 and 4 on fake CPU
devices: greedy tokens equal the single-device cpu backend's (tests/parallel/kernel_tp_checks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.parallel.test_tensor_parallel import FOUR_DEVICES, ROOT


@pytest.mark.slow
def test_gpu_and_tpu_kernels_under_tensor_parallel_match_tp1() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel.kernel_tp_checks"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **FOUR_DEVICES),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # The interpreted TPU kernel at TP 4 needs 4 host cores (models.attention.backend_for).
    expected = 6 if len(os.sched_getaffinity(0)) >= 4 else 5
    assert result.stdout.count("greedy tokens equal") == expected, result.stdout
