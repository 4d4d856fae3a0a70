"""Run JAX's TPU ragged paged attention kernel in the Pallas TPU interpreter (CPU hosts).

`--attention-backend tpu` on a host without a TPU, and the tests, run the real Mosaic kernel
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`) in the TPU interpreter rather than
a stand-in, so what is checked on CPU is the code a TPU runs. Three things stand in the way,
and `interpreted_tpu_kernels()` handles them for the calls traced under it:

* The kernel has no `interpret` argument: the interpreter is chosen by
  `pltpu.force_tpu_interpret_mode`.
* The interpreter reads refs only through index transforms; the kernel reads its KV buffer
  through `ref.reshape(...)` and then a strided index ("'ReshapeTransform' object has no
  attribute 'indices'" in jax 0.10). Such a load is served by reading the view before the
  reshape and applying the reshape and the indices after it in numpy: the same values, as a
  ref reshape only renames a contiguous buffer's elements.
* For 16-bit caches the kernel reads its pages through `ref.bitcast(jnp.uint32)`, which
  the interpreter cannot read either. A bitcast is served the same way, with the TPU's meaning
  of a width change (pairs of rows on the second-minor axis become one 32-bit row;
  `jax._src.state.utils.bitcast`), so bfloat16 caches run interpreted too.

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
from jax._src.state.types import BitcastTransform, ReshapeTransform
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


def _tpu_bitcast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A ref bitcast as a TPU reads it: a width change packs or splits the second-minor axis
    (`jax._src.state.utils.bitcast`), e.g. bfloat16 [2R, C] -> uint32 [R, C], row 2r in the
    low half of word r."""
    dtype = np.dtype(dtype)
    ratio = dtype.itemsize // value.itemsize if dtype.itemsize > value.itemsize else 0
    if ratio:  # narrower -> wider: pairs of rows become one
        *lead, rows, cols = value.shape
        grouped = value.reshape(*lead, rows // ratio, ratio, cols).swapaxes(-1, -2)
        return np.ascontiguousarray(grouped).view(dtype)[..., 0]
    if dtype.itemsize < value.itemsize:  # wider -> narrower: one row becomes several
        split = np.ascontiguousarray(value)[..., None].view(dtype)
        *lead, rows, cols, ratio = split.shape
        return split.swapaxes(-1, -2).reshape(*lead, rows * ratio, cols)
    return value.view(dtype)


_VIEWS = (ReshapeTransform, BitcastTransform)


def _get_through_views(
    token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs
):
    """The interpreter's `get`, which also reads through a ref reshape or bitcast (see module
    doc)."""
    transforms = tuple(transforms)
    cut = next((i for i, t in enumerate(transforms) if isinstance(t, _VIEWS)), None)
    if cut is None:
        return _original_get(
            token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs
        )
    token, whole = _original_get(
        token, device_id, local_core_id, memory_space, buffer_id, transforms[:cut], *args, **kwargs
    )
    value = np.asarray(whole)
    for transform in transforms[cut:]:
        if isinstance(transform, ReshapeTransform):
            value = value.reshape(transform.shape)
        elif isinstance(transform, BitcastTransform):
            value = _tpu_bitcast(value, transform.dtype)
        else:
            value = value[_index(transform)]
    return token, np.ascontiguousarray(value)


# DMAs call the undecorated reader (`get.__wrapped__`); their transforms are plain indices.
_get_through_views.__wrapped__ = _original_get.__wrapped__


@contextlib.contextmanager
def interpreted_tpu_kernels() -> Iterator[None]:
    """Pallas TPU kernels traced inside run in the TPU interpreter, ref reshapes included.

    Tracing happens inside (the first call of a jitted function, or an eager call); the
    compiled interpreter calls the reader when run, so the reader stays installed for the
    life of the process once installed (it only adds a case the original raised on)."""
    _interpreter.get = _get_through_views
    with pltpu.force_tpu_interpret_mode():
        yield
