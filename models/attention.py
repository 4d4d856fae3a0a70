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
               prefill tiles all at once by the cpu backend's online softmax, looping over
               GPU_PREFILL_KEY_BLOCK keys up to the longest tile's length, so its transient
               keys are one block per tile, not each tile's whole page table (that was 2 GiB
               per layer for Llama-3-8B at an 8,192-token prefill budget).
    tpu        `jax.experimental.pallas.ops.tpu.ragged_paged_attention`, both sections at once.
    reference  dense per-token attention, the definition the others are tested against.

Every model tfjax loads runs on every backend. The TPU kernel tiles the combined K/V head axis
only in counts of 1, 2, 4, 8 or multiples of 8 (times the dtype's packing): the TPU layout
pads each shard's KV heads up to such a count (SmolLM2's 3 to 4), the padded heads zero and
their query heads dropped. The GPU kernel pads query-head groups itself.

Where the kernel's accelerator is absent (`backend_for(..., interpret=None)`), the Pallas
kernels themselves run in the interpreter (the TPU one through `models.tpu_interpret`): slow,
for checking on CPU that the accelerator code is right.

Tensor parallelism: with a mesh of several devices the gpu and tpu backends run their kernels
inside `shard_map` over the mesh's KV-head axis, each device on its own heads (query heads
are split the same way by the column-parallel wq); the cpu and reference backends are plain
JAX that GSPMD partitions.

KV layout: each backend keeps the cache in its kernel's native layout (`KVLayout`), chosen
once when the cache is created, so no step ever converts it (docs/architecture/kv.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as tpu_ragged
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.errors import UserError

QUERY_TILE = 32  # prompt tokens per prefill row; chunks pad to a multiple of it
CPU_KEY_BLOCK = 128  # keys per online-softmax step on CPU
GPU_PREFILL_KEY_BLOCK = 256  # ... and for GPU prefill tiles (8,192 tiled tokens x 256 keys:
# 64 MiB of Llama-3-8B bf16 keys per step of the loop)
CPU_ROW_GROUP = 8  # decode rows sharing one key-block loop on CPU (sorted by length)
GPU_K_SPLITS = 16  # Pallas GPU paged attention: page-table partitions per row
GPU_BLOCK_PAGES = 8  # ... and pages per compute block inside a partition
TPU_HEAD_DIM_MULTIPLE = 128  # the TPU kernel's lane width; smaller heads are zero-padded
TPU_KV_HEAD_COUNTS = (1, 2, 4)  # KV heads per shard the TPU kernel tiles, besides multiples
TPU_KV_HEAD_MULTIPLE = 8  # ... of 8 (16-bit caches pack two heads per 32-bit row)
MESH_AXIS = "tp"  # the tensor-parallel mesh axis (models.sharding builds the mesh)
MASKED = float(jnp.finfo(jnp.float32).min)
logger = logging.getLogger("tfjax.attention")

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

    def shape(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int, shards: int = 1):
        """One array's shape; `shards`: tensor-parallel devices the head axis is split over."""
        if self.name == "heads":
            return (kv_heads, num_pages, page_size, head_dim)
        if self.name == "combined":
            heads = shards * _tpu_kv_heads(kv_heads // shards)
            return (num_pages, page_size, 2 * heads, _tpu_head_dim(head_dim))
        return (num_pages, page_size, kv_heads, head_dim)


PAGES = KVLayout("pages", arrays=2, page_axis=0, head_axis=2)  # [P, S, K, Dh] x2
HEADS = KVLayout("heads", arrays=2, page_axis=1, head_axis=0)  # [K, P, S, Dh] x2
COMBINED = KVLayout("combined", arrays=1, page_axis=0, head_axis=2)  # [P, S, 2K, Dh']


@dataclass(frozen=True)
class Backend:
    """One attention implementation and the cache layout it reads. Hashable: a jit static."""

    name: str
    layout: KVLayout
    interpret: bool = False  # run Pallas kernels in the interpreter (no such accelerator)
    mesh: Mesh | None = None  # tensor-parallel mesh: kernels run per KV-head shard

    @property
    def shards(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def cache_shape(self, num_pages: int, page_size: int, kv_heads: int, head_dim: int):
        """Shape of each of a layer's `layout.arrays` cache arrays."""
        return self.layout.shape(num_pages, page_size, kv_heads, head_dim, self.shards)

    def write(self, layer: tuple[jax.Array, ...], slots_T, k_TxKxDh, v_TxKxDh):
        """This step's keys and values into their flat slots (page * S + offset)."""
        if self.layout is COMBINED:
            both = _interleave(k_TxKxDh, v_TxKxDh, self.shards)
            return (_write_slots(layer[0], slots_T, both),)
        if self.layout is HEADS:
            return tuple(
                _write_slots(a, slots_T, new.swapaxes(0, 1), slot_axis=1)
                for a, new in zip(layer, (k_TxKxDh, v_TxKxDh), strict=True)
            )
        return tuple(
            _write_slots(a, slots_T, new)
            for a, new in zip(layer, (k_TxKxDh, v_TxKxDh), strict=True)
        )

    def attend(
        self,
        q_TxHxDh: jax.Array,
        layer: tuple[jax.Array, ...],
        batch: AttentionBatch,
        *,
        kv_heads: int,
    ) -> jax.Array:
        """Attention output [T, H, Dh] of every flat query over its row's cached keys;
        `kv_heads`: the model's (the TPU layout stores more, padded)."""
        with jax.named_scope(f"attention_{self.name}"):
            if self.name == "cpu":
                return _attend_cpu(q_TxHxDh, *layer, batch)
            if self.name == "reference":
                return reference_attention(q_TxHxDh, *layer, batch)
            if self.name == "gpu":
                kernel = partial(_attend_gpu, interpret=self.interpret)
            else:
                kernel = partial(
                    _attend_tpu, kv_heads=kv_heads // self.shards, interpret=self.interpret
                )
            if self.shards == 1:
                return kernel(q_TxHxDh, *layer, batch)
            heads = P(None, MESH_AXIS, None)
            cache = P(*(MESH_AXIS if i == self.layout.head_axis else None for i in range(4)))
            return jax.shard_map(
                kernel,
                mesh=self.mesh,
                in_specs=(heads, *[cache] * len(layer), P()),
                out_specs=heads,
                check_vma=False,  # Pallas calls carry no varying-axes annotations
            )(q_TxHxDh, *layer, batch)


KERNEL_PLATFORMS = {"gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}


def backend_for(
    name: str = "auto", *, interpret: bool | None = None, mesh: Mesh | None = None
) -> Backend:
    """The backend called `name`; "auto" picks by `jax.default_backend()`.

    `interpret` None: interpret the Pallas kernels exactly when their accelerator is not this
    host's (`needs_interpreter`). `mesh`: the tensor-parallel mesh the cache is split over."""
    if name == "auto":
        platform = jax.default_backend()
        name = next((n for n, p in KERNEL_PLATFORMS.items() if platform in p), "cpu")
    layouts = {"cpu": PAGES, "reference": PAGES, "gpu": HEADS, "tpu": COMBINED}
    if name not in layouts:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKEND_NAMES}")
    if interpret is None:
        interpret = needs_interpreter(name)
        if interpret:
            _announce_interpreter(name)
    shards = 1 if mesh is None else mesh.size
    if interpret and name == "tpu" and shards > len(os.sched_getaffinity(0)):
        # Seen at TP 4 on 2 cores: the interpreter waits forever instead.
        raise UserError(
            f"the interpreted TPU kernel runs its {shards} shards at once, in lockstep (a "
            f"barrier per kernel call), and this host has {len(os.sched_getaffinity(0))} cores"
        )
    return Backend(name, layouts[name], interpret, mesh)


@functools.cache
def _announce_interpreter(name: str) -> None:
    """Once per process: a `--attention-backend` whose kernels this host can only interpret."""
    logger.warning(
        "attention backend %s: no %s on this host (jax platform %s); its Pallas kernels run "
        "in the interpreter, slow, for checking only",
        name,
        name.upper(),
        jax.default_backend(),
    )


def needs_interpreter(name: str) -> bool:
    """Whether backend `name`'s Pallas kernels must run interpreted on this host."""
    return name in KERNEL_PLATFORMS and jax.default_backend() not in KERNEL_PLATFORMS[name]


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


def cpu_decode_keys(contexts: Sequence[int], num_rows: int) -> int:
    """Keys `_attend_cpu` reads for decode rows of these context lengths in a bucket of
    `num_rows` rows: sorted longest first (as the runner orders them) and grouped as
    `_decode_groups` says, every row of a group reads its longest row's keys, in whole
    `CPU_KEY_BLOCK`s. What a decode step's attention costs on a CPU, uneven rows included."""
    ordered = sorted(contexts, reverse=True) + [0] * (num_rows - len(contexts))
    keys, first = 0, 0
    for size, count in _decode_groups(num_rows):
        for _ in range(count):
            keys += size * -(-ordered[first] // CPU_KEY_BLOCK) * CPU_KEY_BLOCK
            first += size
    return keys


def _group(batch: AttentionBatch, rows: slice, size: int) -> tuple[jax.Array, ...]:
    """Page tables, KV lengths and query counts of `rows`, split into groups of `size`."""
    table = batch.page_table[rows]
    return (
        table.reshape(-1, size, table.shape[1]),
        batch.kv_lens[rows].reshape(-1, size),
        batch.q_lens[rows].reshape(-1, size),
    )


def _blockwise(
    q_NxRxQxHxDh,
    groups,
    k_pages,
    v_pages,
    *,
    layout: KVLayout = PAGES,
    key_block: int = CPU_KEY_BLOCK,
) -> jax.Array:
    """Flash-style attention of N groups of R rows x Q queries, group by group, each group
    looping over blocks of `key_block` keys up to its longest row. `k_pages`, `v_pages`: one
    layer's cache in `layout` (PAGES or HEADS)."""
    table_NxRxW, kv_lens_NxR, q_lens_NxR = groups
    n, r, nq, h, dh = q_NxRxQxHxDh.shape
    s, k = k_pages.shape[layout.page_axis + 1], k_pages.shape[layout.head_axis]
    g = h // k
    block_pages = max(1, key_block // s)
    table_NxRxW = _pad_width(table_NxRxW, block_pages)
    block = block_pages * s
    num_blocks_N = -(-jnp.max(kv_lens_NxR, axis=1) // block)
    # Queries per KV head as one matrix [R, K, G*Q, Dh], so each block is two plain batched
    # products against its keys and values [R, K, B, Dh] (`_page_block`).
    q_NxRxKxMxDh = (
        (q_NxRxQxHxDh * dh**-0.5)
        .reshape(n, r, nq, k, g, dh)
        .transpose(0, 1, 3, 4, 2, 5)
        .reshape(n, r, k, g * nq, dh)
    )

    def one_group(i, out):
        q = q_NxRxKxMxDh[i]
        table_RxW, kv_len_R = table_NxRxW[i], kv_lens_NxR[i]
        pos_RxQ = (kv_len_R - q_lens_NxR[i])[:, None] + jnp.arange(nq)[None]

        def one_block(j, carry):
            m, total, acc = carry  # max, sum [R, K, M]; output [R, K, M, Dh] (f32)
            pages_RxB = jax.lax.dynamic_slice_in_dim(table_RxW, j * block_pages, block_pages, 1)
            keys, values = (_page_block(a, pages_RxB, layout) for a in (k_pages, v_pages))
            key_pos_B = j * block + jnp.arange(block)
            visible_RxQxB = (key_pos_B[None, None] < kv_len_R[:, None, None]) & (
                key_pos_B[None, None] <= pos_RxQ[:, :, None]
            )
            visible_RxMxB = jnp.broadcast_to(visible_RxQxB[:, None], (r, g, nq, block)).reshape(
                r, g * nq, block
            )
            scores = jnp.einsum("rkmd,rkbd->rkmb", q, keys, preferred_element_type=jnp.float32)
            scores = jnp.where(visible_RxMxB[:, None], scores, MASKED)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            probs = jnp.exp(scores - m_new[..., None])
            scale = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "rkmb,rkbd->rkmd",
                probs.astype(values.dtype),
                values,
                preferred_element_type=jnp.float32,
            )
            return m_new, total * scale + probs.sum(axis=-1), acc * scale[..., None] + pv

        init = (
            jnp.full((r, k, g * nq), MASKED, jnp.float32),
            jnp.zeros((r, k, g * nq), jnp.float32),
            jnp.zeros((r, k, g * nq, dh), jnp.float32),
        )
        _, total, acc = jax.lax.fori_loop(0, num_blocks_N[i], one_block, init)
        o_RxKxGxQxDh = (acc / total[..., None]).reshape(r, k, g, nq, dh)
        o_RxQxHxDh = o_RxKxGxQxDh.transpose(0, 3, 1, 2, 4).reshape(r, nq, h, dh)
        return out.at[i].set(o_RxQxHxDh.astype(out.dtype))

    out = jnp.zeros((n, r, nq, h, dh), q_NxRxQxHxDh.dtype)
    if n == 1:
        return one_group(0, out)
    return jax.lax.fori_loop(0, n, one_group, out)


def _page_block(cache: jax.Array, pages_RxB: jax.Array, layout: KVLayout) -> jax.Array:
    """Keys or values [R, K, B*S, Dh] of pages [R, B] of a PAGES or HEADS layer cache: each
    KV head's keys one matrix, as a batched product wants them (XLA:CPU transposed the page
    layout [R, B*S, K, Dh] inside every product, 11-18 % of the prefill tiles' attention)."""
    r = pages_RxB.shape[0]
    if layout is HEADS:
        k, _, _, dh = cache.shape
        return cache[:, pages_RxB].transpose(1, 0, 2, 3, 4).reshape(r, k, -1, dh)
    _, _, k, dh = cache.shape
    return cache[pages_RxB].transpose(0, 3, 1, 2, 4).reshape(r, k, -1, dh)


# -- gpu: Pallas paged attention for decode rows, key blocks for prefill tiles ---------------


def _attend_gpu(
    q_TxHxDh, k_KxPxSxDh, v_KxPxSxDh, batch: AttentionBatch, *, interpret: bool
) -> jax.Array:
    t, h, dh = q_TxHxDh.shape
    split = batch.num_tiles * QUERY_TILE
    outs = []
    if batch.num_tiles:
        n = batch.num_tiles  # one group of every tile: all loop to the longest tile's keys
        outs.append(
            _blockwise(
                q_TxHxDh[:split].reshape(1, n, QUERY_TILE, h, dh),
                _group(batch, slice(0, n), n),
                k_KxPxSxDh,
                v_KxPxSxDh,
                layout=HEADS,
                key_block=GPU_PREFILL_KEY_BLOCK,
            ).reshape(split, h, dh)
        )
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


# -- tpu: ragged paged attention over both sections -------------------------------------------


def _tpu_head_dim(head_dim: int) -> int:
    return -(-head_dim // TPU_HEAD_DIM_MULTIPLE) * TPU_HEAD_DIM_MULTIPLE


def _tpu_kv_heads(kv_heads: int) -> int:
    """The fewest KV heads >= `kv_heads` the TPU kernel tiles in float32 and bfloat16 alike."""
    if kv_heads in TPU_KV_HEAD_COUNTS:
        return kv_heads
    return -(-kv_heads // TPU_KV_HEAD_MULTIPLE) * TPU_KV_HEAD_MULTIPLE if kv_heads > 4 else 4


def _interleave(k_TxKxDh: jax.Array, v_TxKxDh: jax.Array, shards: int) -> jax.Array:
    """[T, 2K', Dh'] with K at even and V at odd heads (TPU layout): each of `shards` head
    shards zero-padded to `_tpu_kv_heads` heads, Dh zero-padded to the lane width."""
    t, k, dh = k_TxKxDh.shape
    per_shard = k // shards
    pad = ((0, 0), (0, 0), (0, _tpu_kv_heads(per_shard) - per_shard), (0, _tpu_head_dim(dh) - dh))
    k_TxNxKsxDh, v_TxNxKsxDh = (
        jnp.pad(a.reshape(t, shards, per_shard, dh), pad) for a in (k_TxKxDh, v_TxKxDh)
    )
    return jnp.stack([k_TxNxKsxDh, v_TxNxKsxDh], axis=3).reshape(t, -1, _tpu_head_dim(dh))


def _attend_tpu(
    q_TxHxDh, kv_PxSx2KxDh, batch: AttentionBatch, *, kv_heads: int, interpret: bool
) -> jax.Array:
    """Every row gets QT or 1 contiguous queries: pad queries of a partial tile count as real
    ones placed after the row's last position (their outputs are dropped), which keeps the
    kernel's `q_len <= kv_len` causal convention and the tiles contiguous.

    Query heads are padded per KV group to the cache's padded KV heads (zero queries over
    zero keys, dropped after)."""
    t, h, dh = q_TxHxDh.shape
    padded_kv_heads, padded_dh = kv_PxSx2KxDh.shape[2] // 2, kv_PxSx2KxDh.shape[3]
    nq_R = jnp.asarray([QUERY_TILE] * batch.num_tiles + [1] * batch.num_decode_rows, jnp.int32)
    kv_lens_R = batch.kv_lens + nq_R - jnp.maximum(batch.q_lens, 1)
    cu_q_lens = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(nq_R)]).astype(jnp.int32)
    num_rows = jnp.asarray([batch.page_table.shape[0]], jnp.int32)
    k, g = kv_heads, h // kv_heads
    q_TxKxGxDh = jnp.pad(
        q_TxHxDh.reshape(t, k, g, dh),
        ((0, 0), (0, padded_kv_heads - k), (0, 0), (0, padded_dh - dh)),
    )
    blocks, context = {}, contextlib.nullcontext()
    if interpret:  # imported here: it patches private jax internals another jax may lack
        from models import tpu_interpret

        blocks, context = tpu_interpret.INTERPRET_BLOCKS, tpu_interpret.interpreted_tpu_kernels()
    with context:
        out = tpu_ragged.ragged_paged_attention(
            q_TxKxGxDh.reshape(t, padded_kv_heads * g, padded_dh),
            kv_PxSx2KxDh,
            kv_lens_R,
            batch.page_table,
            cu_q_lens,
            num_rows,
            sm_scale=dh**-0.5,
            **blocks,
        )
    return out.reshape(t, padded_kv_heads, g, padded_dh)[:, :k, :, :dh].reshape(t, h, dh)


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
