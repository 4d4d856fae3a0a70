"""Run JAX's TPU ragged paged attention kernel in the Pallas TPU interpreter (CPU hosts).

`--attention-backend tpu` on a host without a TPU, and the tests, run the real Mosaic kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`) in the TPU interpreter rather than
a stand-in, so what is checked on CPU is the code a TPU runs. Two things stand in the way,
and `interpreted_tpu_kernels()` handles both for the calls traced under it:

* The kernel has no `interpret` argument: the interpreter is chosen by
  `pltpu.force_tpu_interpret_mode`.
* The interpreter reads refs only through index transforms; the kernel reads its KV buffer
  through `ref.reshape(...)` and then a strided index ("'ReshapeTransform' object has no
  attribute 'indices'" in jax 0.10). Such a load is served by reading the view before the
  reshape and applying the reshape and the indices after it in numpy: the same values, as a
  ref reshape only renames a contiguous buffer's elements.

Float32 only: for 16-bit caches the kernel also bitcasts its refs (`ref.bitcast`), which the
interpreter cannot read either; bf16 runs on a TPU only (scripts/gpu_check.sh's tpu section).
The tuned block sizes need a TPU generation, so callers pass explicit ones
(`INTERPRET_BLOCKS`): one query per block, because the interpreter's masked store checks
bounds on the first axis only (`in_bounds_mask[in_bounds_shape[i]:]` for every axis i) and
wrongly refuses the kernel's [queries, heads per KV head, Dh] accumulator store when there
are more queries than heads per KV head in a block.
The patched reader is a private jax function, imported by name here: another jax without it
fails at import, never reads wrong (jax is pinned to the tested 0.10 in pyproject.toml).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _interpreter
from jax._src.state.types import ReshapeTransform
from jax.experimental.pallas import tpu as pltpu

INTERPRET_BLOCKS = {"num_kv_pages_per_block": 1, "num_queries_per_block": 1}
_original_get = _interpreter.get


def _index(indexer) -> tuple[int | slice, ...]:
    """A state `NDIndexer` (ints and `Slice(start, size, stride)`) as a numpy index."""
    out: list[int | slice] = []
    for i in indexer.indices:
        if hasattr(i, "stride"):
            start, stride = int(i.start), int(i.stride)
            out.append(slice(start, start + int(i.size) * stride, stride))
        else:
            out.append(int(i))
    return tuple(out)


def _get_through_reshape(
    token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs
):
    """The interpreter's `get`, which also reads through a ref reshape (see module doc)."""
    transforms = tuple(transforms)
    cut = next((i for i, t in enumerate(transforms) if isinstance(t, ReshapeTransform)), None)
    if cut is None:
        return _original_get(
            token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs
        )
    token, whole = _original_get(
        token, device_id, local_core_id, memory_space, buffer_id, transforms[:cut], *args, **kwargs
    )
    value = np.asarray(whole).reshape(transforms[cut].shape)
    for transform in transforms[cut + 1 :]:
        if isinstance(transform, ReshapeTransform):
            value = value.reshape(transform.shape)
        else:
            value = value[_index(transform)]
    return token, np.ascontiguousarray(value)


# DMAs call the undecorated reader (`get.__wrapped__`); their transforms are plain indices.
_get_through_reshape.__wrapped__ = _original_get.__wrapped__


@contextlib.contextmanager
def interpreted_tpu_kernels() -> Iterator[None]:
    """Pallas TPU kernels traced inside run in the TPU interpreter, ref reshapes included.

    Tracing happens inside (the first call of a jitted function, or an eager call); the
    compiled interpreter calls the reader when run, so the reader stays installed for the
    life of the process once installed (it only adds a case the original raised on)."""
    _interpreter.get = _get_through_reshape
    with pltpu.force_tpu_interpret_mode():
        yield
