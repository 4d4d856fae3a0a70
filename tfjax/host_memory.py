"""Keep freed host memory in the process, so XLA:CPU's step temporaries reuse warm pages.

XLA:CPU allocates a step's temporary buffers with malloc and frees them when the step ends.
glibc serves a large block from a fresh `mmap` (always above 32 MB, and from the per-thread
arenas XLA's worker threads get) and unmaps it on free, so every step touches new pages: 16k
page faults for a 64 MB buffer, about 25 ms on the 2-core VM, ten times the arithmetic that
fills it (widening a 2048x8192 int8 weight to float32: 25.5 ms, 2.5 ms with these settings).
Steps whose weights widen to float32 in every step have such temporaries: the `int8`, `fp8`
and `gguf` quantizations, and bfloat16 weights on a CPU (XLA:CPU multiplies in float32).

tcmalloc, which JAX recommends on CPU, would do the same but is no pip package; these are
glibc's documented knobs (mallopt(3)), the equivalents of MALLOC_ARENA_MAX=1,
MALLOC_MMAP_MAX_=0 and MALLOC_TRIM_THRESHOLD_: one arena, no mmap, no trimming. They only take
effect when set before jax starts its backend's threads, so the commands set them right after
parsing their flags, when jax will run on its CPU backend. Only for widening weights: float32
steps have no such temporaries, and the single arena cost a served float32 burst 9 % of its
tokens/s (two alternating repeats, 0.91x both), its threads contending for one malloc lock.
The process also keeps its peak heap instead of returning freed memory (as with tcmalloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1  # the largest value an int parameter takes


# Quantizations whose products widen each weight to float inside the step (`models.quant`);
# `w8a8` multiplies the int8 weight as it is.
WIDENING = frozenset({"int8", "fp8", "gguf"})


def keep_freed_memory(quantization: str | None, dtype: str | None = None) -> bool:
    """Make glibc keep freed memory for reuse when jax will run on the CPU and the weights
    (`quantization`, `dtype`) widen in every step; whether it did (False also where the C
    library is not glibc)."""
    if not _runs_on_cpu() or (quantization not in WIDENING and dtype != "bfloat16"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    applied = all(mallopt(param, value) == 1 for param, value in settings)
    if not applied:
        log.warning("could not tune malloc: quantized CPU steps may be slower")
    return applied


def _runs_on_cpu() -> bool:
    """Whether jax will pick its CPU backend, known before it starts one: JAX_PLATFORMS names
    cpu first, or no accelerator plugin is installed (JAX finds GPU plugins in the
    `jax_plugins` namespace or entry points, the TPU runtime in `libtpu`)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and not any(map(importlib.util.find_spec, ("jax_plugins", "libtpu")))
