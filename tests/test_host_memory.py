"""`tfjax.host_memory`: glibc's malloc told to keep freed memory when quantized weights widen
in every step (where the C library is glibc)."""

import os
import platform
import subprocess
import sys

import pytest

from tfjax.host_memory import keep_freed_memory


@pytest.mark.parametrize(
    ("quantization", "dtype"), [(None, None), (None, "float32"), ("w8a8", None)]
)
def test_float32_and_int8_product_steps_keep_the_default_allocator(quantization, dtype):
    assert keep_freed_memory(quantization, dtype) is False


def test_not_where_jax_runs_on_an_accelerator(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert keep_freed_memory("int8") is False


def test_applies_for_widening_weights_on_a_cpu_with_glibc():
    # In a child process: the setting is process-wide and this one runs the other tests.
    code = "from tfjax.host_memory import keep_freed_memory as k; print(k(None, 'bfloat16'))"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == str(platform.libc_ver()[0] == "glibc"), result.stderr
