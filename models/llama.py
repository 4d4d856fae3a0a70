"""The decoder (Llama 2/3 incl. llama3 rope scaling, SmolLM2, Qwen2/2.5) over a paged KV cache.

Letters used in names (nanodo style, `q_BxTxHxDh`):
    B batch rows, T tokens per row in this step, D model width, H query heads, K KV heads,
    G = H/K query heads per KV head, Dh head dim, P pages in the cache, S tokens per page,
    W pages per row in the page table, L = W*S keys a row can see, V vocab, F MLP width.

Why pure functions over pytrees rather than Flax NNX modules: the engine's Runner jits
`forward` with `cfg` static and `donate_argnames=("kv",)`, so each layer's KV array is updated
in place by XLA; with explicit `Weights`/`KVCache`/`StepInput` pytrees there is no module state
to split at the jit boundary, the parameters enter jit as traced arguments (never baked-in
constants), and the config is a hashable static value shared by every compiled bucket.

The layer loop is unrolled in Python, never `lax.scan`: a KV cache carried through a scan is
copied every step (DESIGN.md measured 410 ms vs 153 ms per batch-32 decode step).

Attention per layer writes this step's K/V into the pages at `slot_ids` first, then gathers the
row's pages through `page_table` and attends over them. Because a row's pages are listed in
order, the index of a key in the gathered [L] axis is its absolute position, so the mask is
`key_pos < kv_lens[b] and key_pos <= positions[b, t]` -- one rule for prefill, chunked prefill
and decode. Page 0 is the padding page: pad tokens write there and pad rows (kv_lens 0) read
garbage that is never used. Compute runs in cfg.dtype; RMSNorm, softmax and logits in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from models import rope
from models.config import ModelConfig
from models.weights import Layer, Weights

PAD_PAGE = 0
SMALL_BATCH_ROWS = 8  # up to this many rows, `_linear` runs one GEMV per row on CPU


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Paged keys and values, one array per layer so each is donated and updated in place."""

    k: list[jax.Array]  # per layer [P, S, K, Dh]
    v: list[jax.Array]  # per layer [P, S, K, Dh]


@jax.tree_util.register_dataclass
@dataclass
class StepInput:
    """One step's tokens and where their keys go / come from; built on the host per step."""

    tokens: jax.Array  # [B, T] int32, pad tokens any id
    positions: jax.Array  # [B, T] int32 absolute position of each token (pad: 0)
    slot_ids: jax.Array  # [B, T] int32 flat slot page*S+offset for the token's K/V (pad: page 0)
    page_table: jax.Array  # [B, W] int32 the row's pages in order; unused entries 0
    kv_lens: jax.Array  # [B] int32 valid keys of the row after this step's writes (pad row: 0)


def init_kv_cache(
    cfg: ModelConfig, num_pages: int, page_size: int, sharding: jax.sharding.Sharding | None = None
) -> KVCache:
    """A zeroed cache of `num_pages` pages (page 0 included) in cfg.dtype.

    The arrays are committed (to `sharding`, by default the default device), like a jitted
    step's outputs, so the first step and every later one hit the same compiled executable.
    """
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    dtype, where = jnp.dtype(cfg.dtype), sharding or jax.devices()[0]
    return KVCache(
        k=[jnp.zeros(shape, dtype, device=where) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype, device=where) for _ in range(cfg.num_layers)],
    )


def forward(
    weights: Weights, cfg: ModelConfig, step: StepInput, kv: KVCache
) -> tuple[jax.Array, KVCache]:
    """Hidden states [B, T, D] after the final norm, and the cache with this step's K/V."""
    x_BxTxD = weights.embed[step.tokens]
    cos_BxTxDh, sin_BxTxDh = rope.cos_sin(cfg, step.positions)
    page_size = kv.k[0].shape[1]
    key_pos_L = jnp.arange(step.page_table.shape[1] * page_size, dtype=jnp.int32)
    mask_BxTxL = (key_pos_L[None, None, :] < step.kv_lens[:, None, None]) & (
        key_pos_L[None, None, :] <= step.positions[:, :, None]
    )
    new_k, new_v = [], []
    for layer, k_PxSxKxDh, v_PxSxKxDh in zip(weights.layers, kv.k, kv.v, strict=True):
        h_BxTxD = _rms_norm(x_BxTxD, layer.attn_norm, cfg.rms_norm_eps)
        attn_BxTxD, k_PxSxKxDh, v_PxSxKxDh = _attention(
            layer, cfg, h_BxTxD, cos_BxTxDh, sin_BxTxDh, step, mask_BxTxL, k_PxSxKxDh, v_PxSxKxDh
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + _mlp(layer, _rms_norm(x_BxTxD, layer.mlp_norm, cfg.rms_norm_eps))
        new_k.append(k_PxSxKxDh)
        new_v.append(v_PxSxKxDh)
    return _rms_norm(x_BxTxD, weights.final_norm, cfg.rms_norm_eps), KVCache(k=new_k, v=new_v)


def logits(weights: Weights, cfg: ModelConfig, hidden_xD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final-norm hidden states [..., D] (tied head uses `embed`)."""
    if weights.lm_head is None:
        return jnp.einsum(
            "...d,vd->...v", hidden_xD, weights.embed, preferred_element_type=jnp.float32
        )
    return jnp.einsum(
        "...d,dv->...v", hidden_xD, weights.lm_head, preferred_element_type=jnp.float32
    )


def _rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalize in float32, cast back, then scale."""
    x32 = x_BxTxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x_BxTxD.dtype) * scale_D[None, None, :]


def _attention(
    layer: Layer,
    cfg: ModelConfig,
    x_BxTxD: jax.Array,
    cos_BxTxDh: jax.Array,
    sin_BxTxDh: jax.Array,
    step: StepInput,
    mask_BxTxL: jax.Array,
    k_PxSxKxDh: jax.Array,
    v_PxSxKxDh: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention output [B, T, D] and the layer's updated K and V pages."""
    with jax.named_scope("attention"):
        b, t, _ = x_BxTxD.shape
        h, k, g, dh = cfg.num_heads, cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        q = _linear(x_BxTxD, layer.wq)
        kx = _linear(x_BxTxD, layer.wk)
        vx = _linear(x_BxTxD, layer.wv)
        if layer.bq is not None:
            q = q + layer.bq[None, None, :]
            kx = kx + layer.bk[None, None, :]
            vx = vx + layer.bv[None, None, :]
        q_BxTxHxDh = rope.apply(q.reshape(b, t, h, dh), cos_BxTxDh, sin_BxTxDh)
        k_BxTxKxDh = rope.apply(kx.reshape(b, t, k, dh), cos_BxTxDh, sin_BxTxDh)
        v_BxTxKxDh = vx.reshape(b, t, k, dh)

        k_PxSxKxDh = _write_pages(k_PxSxKxDh, step.slot_ids, k_BxTxKxDh)
        v_PxSxKxDh = _write_pages(v_PxSxKxDh, step.slot_ids, v_BxTxKxDh)
        keys_BxLxKxDh = _gather_pages(k_PxSxKxDh, step.page_table)
        values_BxLxKxDh = _gather_pages(v_PxSxKxDh, step.page_table)

        # GQA without repeating K/V: each KV head serves its G query heads in one einsum.
        q_BxTxKxGxDh = q_BxTxHxDh.reshape(b, t, k, g, dh)
        scores_BxKxGxTxL = jnp.einsum(
            "btkgd,blkd->bkgtl", q_BxTxKxGxDh, keys_BxLxKxDh, preferred_element_type=jnp.float32
        ) * (dh**-0.5)
        # A finite floor instead of -inf keeps fully masked (pad) rows free of NaN.
        scores_BxKxGxTxL = jnp.where(
            mask_BxTxL[:, None, None, :, :], scores_BxKxGxTxL, jnp.finfo(jnp.float32).min
        )
        probs_BxKxGxTxL = jax.nn.softmax(scores_BxKxGxTxL, axis=-1).astype(x_BxTxD.dtype)
        out_BxTxKxGxDh = jnp.einsum("bkgtl,blkd->btkgd", probs_BxKxGxTxL, values_BxLxKxDh)
        out_BxTxD = _linear(out_BxTxKxGxDh.reshape(b, t, h * dh), layer.wo)
        return out_BxTxD, k_PxSxKxDh, v_PxSxKxDh


def _write_pages(pages_PxSxKxDh: jax.Array, slot_ids_BxT: jax.Array, new_BxTxKxDh: jax.Array):
    """Scatter each token's K or V to its flat slot; in place when the cache is donated.

    A one-token write would lower to a dynamic-update-slice, after which XLA CPU copies the
    whole layer cache (60 copies per SmolLM2 step, seen in the compiled HLO); a second update
    into the padding page's slot 0 keeps it a scatter, which stays in place.
    """
    p, s, k, dh = pages_PxSxKxDh.shape
    slots = slot_ids_BxT.reshape(-1)
    updates = new_BxTxKxDh.reshape(-1, k, dh)
    if slots.shape[0] == 1:
        slots = jnp.concatenate([slots, jnp.zeros_like(slots)])  # slot 0: in PAD_PAGE
        updates = jnp.concatenate([updates, updates])
    flat = pages_PxSxKxDh.reshape(p * s, k, dh).at[slots].set(updates)
    return flat.reshape(p, s, k, dh)


def _linear(x_xI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """x @ w, as one matrix-vector product per row when there are few rows, on CPU.

    XLA CPU's matrix-matrix kernel is slow for 2-8 rows: on SmolLM2's [576, 1536] weights, 8
    rows took 51 ms per 30 layers as one GEMM but 18 ms as 8 GEMVs (each weight stays in cache
    across the rows), and 2 rows were 2x slower than 1. Decode batches are that small, so
    this decides batch-1..8 step time. The row count is static, so this is a trace-time choice.
    """
    rows = math.prod(x_xI.shape[:-1])
    if rows == 1 or rows > SMALL_BATCH_ROWS or jax.default_backend() != "cpu":
        return x_xI @ w_IxO
    flat_RxI = x_xI.reshape(rows, -1)
    out_RxO = jnp.stack([flat_RxI[i] @ w_IxO for i in range(rows)])
    return out_RxO.reshape(*x_xI.shape[:-1], w_IxO.shape[-1])


def _gather_pages(pages_PxSxKxDh: jax.Array, page_table_BxW: jax.Array) -> jax.Array:
    """The row's pages in order, flattened to [B, L=W*S, K, Dh] so index == position."""
    b, w = page_table_BxW.shape
    _, s, k, dh = pages_PxSxKxDh.shape
    return pages_PxSxKxDh[page_table_BxW].reshape(b, w * s, k, dh)


def _mlp(layer: Layer, x_BxTxD: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    with jax.named_scope("mlp"):
        gate_BxTxF = jax.nn.silu(_linear(x_BxTxD, layer.w_gate))
        return _linear(gate_BxTxF * _linear(x_BxTxD, layer.w_up), layer.w_down)


def single_sequence_step(
    tokens: Sequence[int], start: int, page_size: int, num_row_pages: int, pad_to: int = 0
) -> StepInput:
    """A B=1 step for `tokens` at positions start.. of one sequence on pages 1..num_row_pages.

    For tests and `tfjax generate`: the cache needs num_row_pages + 1 pages (page 0 is padding).
    With `pad_to`, pad tokens (id 0, position 0, writing into page 0) extend T to that length.
    """
    if start + len(tokens) > num_row_pages * page_size:
        raise ValueError(f"{start + len(tokens)} tokens exceed {num_row_pages} pages")
    num_pad = max(pad_to - len(tokens), 0)
    positions = np.arange(start, start + len(tokens), dtype=np.int32)
    slots = (1 + positions // page_size) * page_size + positions % page_size
    pad_slots = PAD_PAGE * page_size + np.arange(num_pad, dtype=np.int32) % page_size
    return StepInput(
        tokens=jnp.asarray([[*tokens] + [0] * num_pad], dtype=jnp.int32),
        positions=jnp.asarray(np.pad(positions, (0, num_pad))[None]),
        slot_ids=jnp.asarray(np.concatenate([slots, pad_slots])[None]),
        page_table=jnp.arange(1, num_row_pages + 1, dtype=jnp.int32)[None],
        kv_lens=jnp.asarray([start + len(tokens)], dtype=jnp.int32),
    )
