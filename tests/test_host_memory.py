"""`tfjax.host_memory`: glibc's malloc told to keep freed memory when quantized weights widen
in every step (where the C library is glibc)."""

import platform
import subprocess
import sys

import pytest

from tfjax.host_memory import keep_freed_memory


@pytest.mark.parametrize("quantization", [None, "w8a8"])
def test_float_and_int8_product_steps_keep_the_default_allocator(quantization):
    assert keep_freed_memory(quantization) is False


def test_applies_for_widening_weights_on_glibc():
    # In a child process: the setting is process-wide and this one runs the other tests.
    code = "from tfjax.host_memory import keep_freed_memory; print(keep_freed_memory('int8'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == str(platform.libc_ver()[0] == "glibc"), result.stderr
