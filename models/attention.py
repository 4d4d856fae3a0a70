"""Paged attention: one entry point (`Backend.attend`), one backend per platform.

The step is one token-flattened ragged batch (`AttentionBatch`): tokens [T] are grouped in
attention *rows*, each with its own page table, KV length and number of queries. Rows come in
two static sections so that every backend gets fixed shapes:
    prefill tiles: `num_tiles` rows of QUERY_TILE tokens each (flat tokens [0, num_tiles*QT)),
                   one tile holding up to QT consecutive prompt tokens of one request;
    decode rows:   one token each (flat tokens [num_tiles*QT, T)).
A row's queries are its last `q_lens[r]` positions: query i sits at position
`kv_lens[r] - q_lens[r] + i` and sees keys `0..` that position (causal) -- one rule for prefill
chunks, chunked prefill and decode, and the convention of JAX's ragged paged attention kernel.
Pad rows have q_len 0 and kv_len 1 (they see one key of the padding page: no empty softmax);
pad queries of a partial tile see the row's keys and their outputs are never used.

Backends (`backend_for`, `--attention-backend`), all reading only each row's own pages:
    cpu        pure JAX: online softmax over key blocks, `fori_loop`s bounded per row group.
    gpu        `jax.experimental.pallas.ops.gpu.paged_attention` (Triton) for decode rows;
               `jax.nn.dot_product_attention(implementation="cudnn")` for prefill tiles.
    tpu        `jax.experimental.pallas.ops.tpu.ragged_paged_attention`, both sections at once.
    reference  dense per-token attention, the definition the others are tested against.

KV layout: each backend keeps the cache in its kernel's native layout (`KVLayout`), chosen
once when the cache is created, so no step ever converts it (docs/architecture/kv.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as tpu_ragged

QUERY_TILE = 32  # prompt tokens per prefill row; chunks pad to a multiple of it
CPU_KEY_BLOCK = 128  # keys per online-softmax step on CPU
CPU_ROW_GROUP = 8  # decode rows sharing one key-block loop on CPU (sorted by length)
GPU_K_SPLITS = 16  # Pallas GPU paged attention: page-table partitions per row
GPU_BLOCK_PAGES = 8  # ... and pages per compute block inside a partition
TPU_HEAD_DIM_MULTIPLE = 128  # the TPU kernel's lane width; smaller heads are zero-padded
MASKED = float(jnp.finfo(jnp.float32).min)

BackendName = Literal["auto", "cpu", "gpu", "tpu", "reference"]
BACKEND_NAMES: tuple[str, ...] = ("auto", "cpu", "gpu", "tpu", "reference")


@flax.struct.dataclass
class AttentionBatch:
    """Where each attention row's keys are: built on the host per step (see module doc)."""

    page_table: jax.Array  # [R, W] int32, the row's pages in order; unused entries PAD_PAGE
    kv_lens: jax.Array  # [R] int32, keys visible to the row's last query
    q_lens: jax.Array  # [R] int32, valid queries of the row (pad rows: 0)
    num_tiles: int = flax.struct.field(pytree_node=False)  # prefill rows come first

    @property
    def num_decode_rows(self) -> int:
        return self.page_table.shape[0] - self.num_tiles


@dataclass(frozen=True)
class KVLayout:
    """How one layer's pages are stored: `arrays` arrays of `shape(...)` each."""

    name: str
    arrays: int  # 2: separate K and V; 1: K and V interleaved on the head axis
    page_axis: int
    head_axis: int

    def shape(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int):
        if self.name == "heads":
            return (kv_heads, num_pages, page_size, head_dim)
        if self.name == "combined":
            return (num_pages, page_size, 2 * kv_heads, _tpu_head_dim(head_dim))
        return (num_pages, page_size, kv_heads, head_dim)


PAGES = KVLayout("pages", arrays=2, page_axis=0, head_axis=2)  # [P, S, K, Dh] x2
HEADS = KVLayout("heads", arrays=2, page_axis=1, head_axis=0)  # [K, P, S, Dh] x2
COMBINED = KVLayout("combined", arrays=1, page_axis=0, head_axis=2)  # [P, S, 2K, Dh']


@dataclass(frozen=True)
class Backend:
    """One attention implementation and the cache layout it reads. Hashable: a jit static."""

    name: str
    layout: KVLayout
    interpret: bool = False  # run Pallas kernels in the interpreter (tests on CPU)

    def write(self, layer: tuple[jax.Array, ...], slots_T, k_TxKxDh, v_TxKxDh):
        """This step's keys and values into their flat slots (page * S + offset)."""
        if self.layout is COMBINED:
            return (_write_slots(layer[0], slots_T, _interleave(k_TxKxDh, v_TxKxDh)),)
        if self.layout is HEADS:
            return tuple(
                _write_slots(a, slots_T, new.swapaxes(0, 1), slot_axis=1)
                for a, new in zip(layer, (k_TxKxDh, v_TxKxDh), strict=True)
            )
        return tuple(
            _write_slots(a, slots_T, new)
            for a, new in zip(layer, (k_TxKxDh, v_TxKxDh), strict=True)
        )

    def attend(self, q_TxHxDh: jax.Array, layer: tuple[jax.Array, ...], batch: AttentionBatch):
        """Attention output [T, H, Dh] of every flat query over its row's cached keys."""
        with jax.named_scope(f"attention_{self.name}"):
            if self.name == "cpu":
                return _attend_cpu(q_TxHxDh, *layer, batch)
            if self.name == "gpu":
                return _attend_gpu(q_TxHxDh, *layer, batch, interpret=self.interpret)
            if self.name == "tpu":
                return _attend_tpu(q_TxHxDh, layer[0], batch)
            return reference_attention(q_TxHxDh, *layer, batch)


def backend_for(name: str = "auto", *, interpret: bool = False) -> Backend:
    """The backend called `name`; "auto" picks by `jax.default_backend()`."""
    if name == "auto":
        platform = jax.default_backend()
        name = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform, "cpu")
    layouts = {"cpu": PAGES, "reference": PAGES, "gpu": HEADS, "tpu": COMBINED}
    if name not in layouts:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKEND_NAMES}")
    return Backend(name, layouts[name], interpret)


def row_of_token(batch: AttentionBatch) -> np.ndarray:
    """Static [T] row index of each flat token (tiles first, then one token per decode row)."""
    tiles = np.repeat(np.arange(batch.num_tiles, dtype=np.int32), QUERY_TILE)
    decode = np.arange(batch.num_decode_rows, dtype=np.int32) + batch.num_tiles
    return np.concatenate([tiles, decode])


def query_index(batch: AttentionBatch) -> np.ndarray:
    """Static [T] index of each flat token among its row's queries."""
    tiles = np.tile(np.arange(QUERY_TILE, dtype=np.int32), batch.num_tiles)
    return np.concatenate([tiles, np.zeros(batch.num_decode_rows, np.int32)])


# -- reference -------------------------------------------------------------------------------


def reference_attention(q_TxHxDh, k_PxSxKxDh, v_PxSxKxDh, batch: AttentionBatch) -> jax.Array:
    """Dense definition: each query gathers its row's whole page table and masks it."""
    t, h, dh = q_TxHxDh.shape
    _, s, k, _ = k_PxSxKxDh.shape
    rows_T = row_of_token(batch)
    pages_TxW = batch.page_table[rows_T]
    keys_TxLxKxDh = k_PxSxKxDh[pages_TxW].reshape(t, -1, k, dh)
    values_TxLxKxDh = v_PxSxKxDh[pages_TxW].reshape(t, -1, k, dh)
    kv_len_T = batch.kv_lens[rows_T]
    pos_T = kv_len_T - batch.q_lens[rows_T] + query_index(batch)
    key_pos_L = jnp.arange(keys_TxLxKxDh.shape[1])
    mask_TxL = (key_pos_L[None] < kv_len_T[:, None]) & (key_pos_L[None] <= pos_T[:, None])
    q_TxKxGxDh = q_TxHxDh.reshape(t, k, h // k, dh)
    scores = jnp.einsum(
        "tkgd,tlkd->tkgl", q_TxKxGxDh, keys_TxLxKxDh, preferred_element_type=jnp.float32
    ) * (dh**-0.5)
    scores = jnp.where(mask_TxL[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_TxHxDh.dtype)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, values_TxLxKxDh)
    return out.reshape(t, h, dh)


# -- cpu: online softmax over key blocks, loops bounded per row group -------------------------


def _cpu_block_pages(page_size: int) -> int:
    return max(1, CPU_KEY_BLOCK // page_size)


def _pad_width(table: jax.Array, multiple: int) -> jax.Array:
    """The page table widened with padding-page entries to a multiple of `multiple` columns
    (a kernel's block of pages; the entries past a row's length are never read)."""
    extra = -table.shape[-1] % multiple
    return jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, extra)]) if extra else table


def _attend_cpu(q_TxHxDh, k_PxSxKxDh, v_PxSxKxDh, batch: AttentionBatch) -> jax.Array:
    """Prefill tiles one row per group; decode rows (the runner sorts them longest first) in
    groups of 1, 1, 2, 4, then CPU_ROW_GROUP: each group loops over the key blocks of its
    longest row only, so one long context costs its own row, not a group of 8 (batch 32 with
    one 3,000-token row among 100-token ones: 252 ms a step in groups of 8, 157 ms so)."""
    t, h, dh = q_TxHxDh.shape
    split = batch.num_tiles * QUERY_TILE
    outs = []
    if batch.num_tiles:
        tiles = slice(0, batch.num_tiles)
        outs.append(
            _blockwise(
                q_TxHxDh[:split].reshape(batch.num_tiles, 1, QUERY_TILE, h, dh),
                _group(batch, tiles, 1),
                k_PxSxKxDh,
                v_PxSxKxDh,
            ).reshape(split, h, dh)
        )
    first = 0
    for size, count in _decode_groups(batch.num_decode_rows):
        rows = slice(batch.num_tiles + first, batch.num_tiles + first + size * count)
        queries = q_TxHxDh[split + first : split + first + size * count]
        outs.append(
            _blockwise(
                queries.reshape(count, size, 1, h, dh),
                _group(batch, rows, size),
                k_PxSxKxDh,
                v_PxSxKxDh,
            ).reshape(size * count, h, dh)
        )
        first += size * count
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]


def _decode_groups(num_rows: int) -> list[tuple[int, int]]:
    """(group size, number of groups) covering `num_rows` decode rows in order: groups of 1,
    1, 2, 4 (doubling up to CPU_ROW_GROUP), then groups of CPU_ROW_GROUP (a row bucket is a
    power of two or the batch cap; a remainder gets groups of its gcd with CPU_ROW_GROUP)."""
    head = [1] + [1 << k for k in range(CPU_ROW_GROUP.bit_length() - 1)]
    sections, left = [], num_rows
    for size in head:
        if not left:
            break
        sections.append((min(size, left), 1))
        left -= sections[-1][0]
    if left:
        group = math.gcd(left, CPU_ROW_GROUP)
        sections.append((group, left // group))
    return sections


def _group(batch: AttentionBatch, rows: slice, size: int) -> tuple[jax.Array, ...]:
    """Page tables, KV lengths and query counts of `rows`, split into groups of `size`."""
    table = batch.page_table[rows]
    return (
        table.reshape(-1, size, table.shape[1]),
        batch.kv_lens[rows].reshape(-1, size),
        batch.q_lens[rows].reshape(-1, size),
    )


def _blockwise(q_NxRxQxHxDh, groups, k_PxSxKxDh, v_PxSxKxDh) -> jax.Array:
    """Flash-style attention of N groups of R rows x Q queries, group by group."""
    table_NxRxW, kv_lens_NxR, q_lens_NxR = groups
    n, r, nq, h, dh = q_NxRxQxHxDh.shape
    _, s, k, _ = k_PxSxKxDh.shape
    g = h // k
    block_pages = _cpu_block_pages(s)
    table_NxRxW = _pad_width(table_NxRxW, block_pages)
    block = block_pages * s
    num_blocks_N = -(-jnp.max(kv_lens_NxR, axis=1) // block)
    q_NxRxQxKxGxDh = (q_NxRxQxHxDh * dh**-0.5).reshape(n, r, nq, k, g, dh)

    def one_group(i, out):
        q = q_NxRxQxKxGxDh[i]
        table_RxW, kv_len_R = table_NxRxW[i], kv_lens_NxR[i]
        pos_RxQ = (kv_len_R - q_lens_NxR[i])[:, None] + jnp.arange(nq)[None]

        def one_block(j, carry):
            m, total, acc = carry  # max, sum [R, K, G, Q]; output [R, K, G, Q, Dh] (f32)
            pages_RxB = jax.lax.dynamic_slice_in_dim(table_RxW, j * block_pages, block_pages, 1)
            keys = k_PxSxKxDh[pages_RxB].reshape(r, block, k, dh)
            values = v_PxSxKxDh[pages_RxB].reshape(r, block, k, dh)
            key_pos_B = j * block + jnp.arange(block)
            visible_RxQxB = (key_pos_B[None, None] < kv_len_R[:, None, None]) & (
                key_pos_B[None, None] <= pos_RxQ[:, :, None]
            )
            scores = jnp.einsum("rqkgd,rbkd->rkgqb", q, keys, preferred_element_type=jnp.float32)
            scores = jnp.where(visible_RxQxB[:, None, None], scores, MASKED)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            probs = jnp.exp(scores - m_new[..., None])
            scale = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "rkgqb,rbkd->rkgqd",
                probs.astype(values.dtype),
                values,
                preferred_element_type=jnp.float32,
            )
            return m_new, total * scale + probs.sum(axis=-1), acc * scale[..., None] + pv

        init = (
            jnp.full((r, k, g, nq), MASKED, jnp.float32),
            jnp.zeros((r, k, g, nq), jnp.float32),
            jnp.zeros((r, k, g, nq, dh), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(0, num_blocks_N[i], one_block, init)
        o_RxQxHxDh = (acc / total[..., None]).transpose(0, 3, 1, 2, 4).reshape(r, nq, h, dh)
        return out.at[i].set(o_RxQxHxDh.astype(out.dtype))

    out = jnp.zeros((n, r, nq, h, dh), q_NxRxQxHxDh.dtype)
    if n == 1:
        return one_group(0, out)
    return jax.lax.fori_loop(0, n, one_group, out)


# -- gpu: Pallas paged attention for decode rows, cuDNN for prefill tiles ---------------------


def _attend_gpu(
    q_TxHxDh, k_KxPxSxDh, v_KxPxSxDh, batch: AttentionBatch, *, interpret: bool
) -> jax.Array:
    t, h, dh = q_TxHxDh.shape
    split = batch.num_tiles * QUERY_TILE
    outs = []
    if batch.num_tiles:
        outs.append(_prefill_tiles_dense(q_TxHxDh[:split], k_KxPxSxDh, v_KxPxSxDh, batch))
    if batch.num_decode_rows:
        # Partitions past a row's length are skipped by the kernel, so padding is cheap.
        table_RxW = _pad_width(batch.page_table[batch.num_tiles :], GPU_K_SPLITS * GPU_BLOCK_PAGES)
        outs.append(
            gpu_paged.paged_attention(
                q_TxHxDh[split:] * jnp.asarray(dh**-0.5, q_TxHxDh.dtype),
                k_KxPxSxDh,
                v_KxPxSxDh,
                table_RxW,
                batch.kv_lens[batch.num_tiles :],
                k_splits=GPU_K_SPLITS,
                pages_per_compute_block=GPU_BLOCK_PAGES,
                interpret=interpret,
            )
        )
    return jnp.concatenate(outs) if len(outs) > 1 else outs[0]


def _prefill_tiles_dense(q_TxHxDh, k_KxPxSxDh, v_KxPxSxDh, batch: AttentionBatch) -> jax.Array:
    """Each tile gathers its own row's pages and runs fused attention (cuDNN on CUDA).

    Prefill is compute-bound; the causal offset of a chunk (its queries are the last q_len
    positions) is an explicit mask, as cuDNN's causal mode assumes aligned sequences."""
    t, h, dh = q_TxHxDh.shape
    k, _, s, _ = k_KxPxSxDh.shape
    n = batch.num_tiles
    table_NxW = batch.page_table[:n]
    keys = k_KxPxSxDh[:, table_NxW].transpose(1, 2, 3, 0, 4).reshape(n, -1, k, dh)
    values = v_KxPxSxDh[:, table_NxW].transpose(1, 2, 3, 0, 4).reshape(n, -1, k, dh)
    kv_len_N, q_len_N = batch.kv_lens[:n], batch.q_lens[:n]
    pos_NxQ = (kv_len_N - q_len_N)[:, None] + jnp.arange(QUERY_TILE)[None]
    key_pos_L = jnp.arange(keys.shape[1])
    mask = (key_pos_L[None, None] <= pos_NxQ[:, :, None]) & (
        key_pos_L[None, None] < kv_len_N[:, None, None]
    )
    out = jax.nn.dot_product_attention(
        q_TxHxDh.reshape(n, QUERY_TILE, h, dh),
        keys,
        values,
        mask=mask[:, None],
        implementation="cudnn" if _cudnn_ok(q_TxHxDh.dtype) else None,
    )
    return out.reshape(t, h, dh)


def _cudnn_ok(dtype) -> bool:
    """cuDNN flash attention runs on CUDA in 16-bit floats only."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


# -- tpu: ragged paged attention over both sections -------------------------------------------


def _tpu_head_dim(head_dim: int) -> int:
    return -(-head_dim // TPU_HEAD_DIM_MULTIPLE) * TPU_HEAD_DIM_MULTIPLE


def _interleave(k_TxKxDh: jax.Array, v_TxKxDh: jax.Array) -> jax.Array:
    """[T, 2K, Dh'] with K at even and V at odd heads, Dh zero-padded (TPU layout)."""
    t, k, dh = k_TxKxDh.shape
    pad = ((0, 0), (0, 0), (0, _tpu_head_dim(dh) - dh))
    both = jnp.stack([jnp.pad(k_TxKxDh, pad), jnp.pad(v_TxKxDh, pad)], axis=2)
    return both.reshape(t, 2 * k, -1)


def _attend_tpu(q_TxHxDh, kv_PxSx2KxDh, batch: AttentionBatch, *, kernel=None) -> jax.Array:
    """Every row gets QT or 1 contiguous queries: pad queries of a partial tile count as real
    ones placed after the row's last position (their outputs are dropped), which keeps the
    kernel's `q_len <= kv_len` causal convention and the tiles contiguous."""
    t, h, dh = q_TxHxDh.shape
    padded_dh = kv_PxSx2KxDh.shape[-1]
    nq_R = jnp.asarray([QUERY_TILE] * batch.num_tiles + [1] * batch.num_decode_rows, jnp.int32)
    kv_lens_R = batch.kv_lens + nq_R - jnp.maximum(batch.q_lens, 1)
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(nq_R)]).astype(jnp.int32)
    num_rows = jnp.asarray([batch.page_table.shape[0]], jnp.int32)
    q = jnp.pad(q_TxHxDh, ((0, 0), (0, 0), (0, padded_dh - dh)))
    run = kernel or partial(tpu_ragged.ragged_paged_attention)
    out = run(q, kv_PxSx2KxDh, kv_lens_R, batch.page_table, cu_q_lens, num_rows, sm_scale=dh**-0.5)
    return out[..., :dh]


def _write_slots(pages, slots_T: jax.Array, new: jax.Array, slot_axis: int = 0) -> jax.Array:
    """Scatter each token's K or V (tokens on `slot_axis` of `new`) to its flat slot
    page * S + offset, the page and offset axes starting at `slot_axis` of `pages`; in place
    when the cache is donated.

    A one-token write would lower to a dynamic-update-slice, after which XLA CPU copies the
    whole layer cache (60 copies per SmolLM2 step, seen in the compiled HLO); a second update
    into the padding page's slot 0 keeps it a scatter, which stays in place.
    """
    if slots_T.shape[0] == 1:
        slots_T = jnp.concatenate([slots_T, jnp.zeros_like(slots_T)])  # slot 0: PAD_PAGE
        new = jnp.concatenate([new, new], axis=slot_axis)
    shape = pages.shape
    flat_shape = (
        *shape[:slot_axis],
        shape[slot_axis] * shape[slot_axis + 1],
        *shape[slot_axis + 2 :],
    )
    index = (slice(None),) * slot_axis + (slots_T,)
    return pages.reshape(flat_shape).at[index].set(new).reshape(shape)
