"""Every attention backend against the dense reference on CPU.

Batches mix prefill tiles (full and partial, first and later chunks) with decode rows of very
different lengths and empty padding rows; the cache holds random keys everywhere, so a backend
that reads a page outside a row's table, or a key past a query's position, gives a different
answer. Both Pallas kernels are the real ones: the GPU kernel in the Pallas interpreter, the
TPU kernel in the Pallas TPU interpreter (`models.tpu_interpret`), for every head layout of
the models tfjax loads.

On a GPU (`scripts/gpu_check.sh`) the same tests run the Triton kernel compiled, at the dtype
in $TFJAX_ATTENTION_DTYPE (bfloat16 there; float32 by default); both interpreted kernels are
also checked at bfloat16 on CPU.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, tpu_interpret
from models.attention import QUERY_TILE, AttentionBatch, backend_for

HEAD_DIM = 16
DTYPE = jnp.dtype(os.environ.get("TFJAX_ATTENTION_DTYPE", "float32"))


def _atol(dtype: jnp.dtype) -> float:
    """float32 agrees to rounding; bfloat16 outputs (|o| < 4) to a few of its 8 mantissa
    bits."""
    return 2e-5 if jnp.dtype(dtype).itemsize == 4 else 4e-2


ATOL = _atol(DTYPE)


def _batch(
    rng,
    page_size: int,
    kv_heads: int,
    groups: int,
    *,
    decode_lens,
    prefill,
    head_dim=HEAD_DIM,
    dtype=DTYPE,
):
    """A cache of random K/V, one row table per request, and the flat query batch.

    `prefill`: (start, num_tokens) per chunk; `decode_lens`: KV length per decode row, 0 for
    a padding row. Each request owns distinct pages in a shuffled order."""
    rows = [(s + n, n) for s, n in prefill]
    num_pages = (
        1
        + sum(-(-(kv or 1) // page_size) for kv, _ in rows)
        + sum(-(-(d or 1) // page_size) for d in decode_lens)
    )
    width = max(-(-max([kv for kv, _ in rows] + list(decode_lens) + [1]) // page_size), 1)
    free = list(rng.permutation(np.arange(1, num_pages)))
    tables, kv_lens, q_lens = [], [], []
    for kv, n in rows:
        pages = [free.pop() for _ in range(-(-kv // page_size))]
        for tile_start in range(0, n, QUERY_TILE):
            q = min(QUERY_TILE, n - tile_start)
            tables.append(pages + [0] * (width - len(pages)))
            kv_lens.append(kv - n + tile_start + q)
            q_lens.append(q)
    num_tiles = len(tables)
    for d in decode_lens:
        pages = [free.pop() for _ in range(-(-d // page_size))] if d else []
        tables.append(pages + [0] * (width - len(pages)))
        kv_lens.append(d or 1)
        q_lens.append(1 if d else 0)
    batch = AttentionBatch(
        page_table=jnp.asarray(tables, jnp.int32),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        q_lens=jnp.asarray(q_lens, jnp.int32),
        num_tiles=num_tiles,
    )
    t = num_tiles * QUERY_TILE + len(decode_lens)
    q = jnp.asarray(rng.normal(size=(t, kv_heads * groups, head_dim)), dtype)
    slots_kv = rng.normal(size=(2, num_pages * page_size, kv_heads, head_dim))
    return batch, q, jnp.asarray(slots_kv, jnp.float32), num_pages


def _cache(backend, slots_kv, num_pages, page_size, dtype):
    shape = backend.cache_shape(num_pages, page_size, *slots_kv.shape[2:])
    layer = tuple(jnp.zeros(shape, dtype) for _ in range(backend.layout.arrays))
    slots = jnp.arange(num_pages * page_size, dtype=jnp.int32)
    return backend.write(layer, slots, slots_kv[0].astype(dtype), slots_kv[1].astype(dtype))


def _valid(batch: AttentionBatch) -> np.ndarray:
    """Flat query indices whose output is used (valid queries of non-padding rows)."""
    rows = attention.row_of_token(batch)
    return np.flatnonzero(attention.query_index(batch) < np.asarray(batch.q_lens)[rows])


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _run(backend, q, batch, layer, kv_heads: int):
    return jax.jit(partial(backend.attend, kv_heads=kv_heads))(q, layer, batch)


def _check(
    name: str, rng, page_size: int, kv_heads: int, groups: int, spec, dtype=DTYPE, **kw
) -> None:
    """Backend `name` (its Pallas kernel interpreted on CPU) against the reference."""
    batch, q, slots_kv, num_pages = _batch(
        rng, page_size, kv_heads, groups, **spec, dtype=dtype, **kw
    )
    reference = backend_for("reference")
    want = _run(
        reference, q, batch, _cache(reference, slots_kv, num_pages, page_size, q.dtype), kv_heads
    )
    backend = backend_for(name)  # the real kernel, interpreted where its accelerator is absent
    got = _run(
        backend, q, batch, _cache(backend, slots_kv, num_pages, page_size, q.dtype), kv_heads
    )
    valid = _valid(batch)
    np.testing.assert_allclose(_f32(got)[valid], _f32(want)[valid], atol=_atol(dtype))
    assert np.isfinite(np.asarray(got)).all(), "padding rows must stay finite"


MIXED = dict(decode_lens=[1, 700, 0, 37, 5, 0, 130, 16], prefill=[(0, 45), (64, 32), (300, 7)])
# Few tokens and keys: the TPU interpreter runs the kernel's grid step by step in Python.
SMALL = dict(decode_lens=[1, 40, 0], prefill=[(8, 3)])
# (query heads, KV heads, head dim) of the models tfjax loads.
MODEL_LAYOUTS = [
    pytest.param(9, 3, 64, id="smollm2"),
    pytest.param(32, 8, 128, id="llama3-8b"),
    pytest.param(14, 2, 64, id="qwen2-0.5b"),
    pytest.param(28, 4, 128, id="qwen2-7b"),
]


@pytest.mark.parametrize(
    "name,page_size",
    [("cpu", 8), ("cpu", 16), ("cpu", 32)]
    + [pytest.param("tpu", 16, marks=pytest.mark.slow)],  # interpreted: 40-90 s each
)
@pytest.mark.parametrize("groups", [1, 3, 8])
def test_backend_matches_reference(name, page_size, groups) -> None:
    _check(name, np.random.default_rng(page_size * 10 + groups), page_size, 2, groups, MIXED)


@pytest.mark.parametrize("page_size,groups", [(8, 3), (16, 8), (32, 1)])
def test_gpu_backend(page_size, groups) -> None:
    """Pallas GPU paged attention for decode rows, dense fused attention for prefill tiles;
    decode rows up to 700 keys exercise several of the kernel's splits."""
    _check("gpu", np.random.default_rng(page_size + groups), page_size, 2, groups, MIXED)


@pytest.mark.parametrize("name", ["gpu", "tpu"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", MODEL_LAYOUTS)
def test_kernels_take_every_model_head_layout(name, heads, kv_heads, head_dim) -> None:
    """The real kernels on each supported model's heads: SmolLM2's 3 KV heads are padded to
    the TPU kernel's tiling, not refused ("num_combined_kv_heads=6 can not be XLA fully
    tiled")."""
    rng = np.random.default_rng(heads + head_dim)
    _check(name, rng, 16, kv_heads, heads // kv_heads, SMALL, head_dim=head_dim)


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_interpreted_kernels_read_bfloat16_caches(name) -> None:
    """SmolLM2's layout at bfloat16 through the real kernels in their interpreters (the TPU
    kernel reads 16-bit pages through a ref bitcast, `models.tpu_interpret`)."""
    _check(name, np.random.default_rng(73), 16, 3, 3, SMALL, head_dim=64, dtype=jnp.bfloat16)


@pytest.mark.parametrize("shape", [(4, 3), (2, 6, 5)])
@pytest.mark.parametrize("pair", [("bfloat16", "uint32"), ("uint32", "bfloat16")])
def test_the_interpreters_ref_bitcast_is_jaxs(shape, pair) -> None:
    """`models.tpu_interpret`'s numpy bitcast against JAX's own TPU bitcast semantics."""
    from jax._src.state.utils import bitcast

    src, dst = (jnp.dtype(d) for d in pair)
    rows = shape[-2] * (2 if src.itemsize < dst.itemsize else 1)  # whole words either way
    bits = np.dtype(f"uint{8 * src.itemsize}")
    words = np.random.default_rng(1).integers(0, np.iinfo(bits).max, (*shape[:-2], rows, shape[-1]))
    value = words.astype(bits).view(src)  # any bit pattern: compared bit for bit
    want = np.asarray(bitcast(jnp.asarray(value), dst))
    got = tpu_interpret._tpu_bitcast(value, dst)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_decode_only_and_prefill_only_batches() -> None:
    """Each section alone (the other empty), as the runner's decode-only and prefill-only
    buckets run it."""
    rng = np.random.default_rng(7)
    for spec in (dict(decode_lens=[3, 260], prefill=[]), dict(decode_lens=[], prefill=[(0, 70)])):
        _check("cpu", rng, 16, 3, 3, spec)


def test_reference_is_plain_causal_attention() -> None:
    """The reference itself, against softmax(q k^T / sqrt(d)) v written out for one row."""
    rng = np.random.default_rng(3)
    batch, q, slots_kv, num_pages = _batch(rng, 8, 1, 2, decode_lens=[], prefill=[(0, 5)])
    reference = backend_for("reference")
    got = _f32(_run(reference, q, batch, _cache(reference, slots_kv, num_pages, 8, q.dtype), 1))
    pages = np.asarray(batch.page_table[0])
    order = (pages[:, None] * 8 + np.arange(8)[None]).reshape(-1)[:5]
    keys, values = np.asarray(slots_kv[0])[order, 0], np.asarray(slots_kv[1])[order, 0]
    for i in range(5):
        for head in range(2):
            s = keys[: i + 1] @ _f32(q)[i, head] / np.sqrt(HEAD_DIM)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[i, head], p @ values[: i + 1] / p.sum(), atol=ATOL)


def test_tpu_layout_pads_kv_heads_to_the_kernels_tiling() -> None:
    padded = {k: attention._tpu_kv_heads(k) for k in (1, 2, 3, 4, 5, 8, 12, 16)}
    assert padded == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 12: 16, 16: 16}
    assert backend_for("tpu").cache_shape(4, 16, 3, 64) == (4, 16, 8, 128)  # SmolLM2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="kernels run compiled here")
def test_kernels_off_their_accelerator_are_interpreted_and_announced_once(caplog) -> None:
    attention._announce_interpreter.cache_clear()
    with caplog.at_level(logging.WARNING, logger="tfjax.attention"):
        backends = [backend_for(name) for name in ("gpu", "gpu", "tpu", "cpu")]
    assert [b.interpret for b in backends] == [True, True, True, False]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "attention backend gpu",
        "attention backend tpu",
    ]
