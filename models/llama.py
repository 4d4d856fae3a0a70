"""The decoder (Llama 2/3 incl. llama3 rope scaling, SmolLM2, Qwen2/2.5) over a paged KV cache.

Letters used in names (nanodo style, `q_TxHxDh`):
    T flat tokens of this step (all rows together), D model width, H query heads, K KV heads,
    G = H/K query heads per KV head, Dh head dim, P pages in the cache, S tokens per page,
    R attention rows, W pages per row in the page table, V vocab, F MLP width.

Why pure functions over `flax.struct` pytrees rather than Flax NNX modules: the engine's Runner
jits `forward` with `cfg` and the attention backend static and `donate_argnames=("kv",)`, so
each layer's KV arrays are updated in place by XLA; with explicit `Weights`/`KVCache`/
`StepInput` pytrees there is no module state to split at the jit boundary, the parameters
enter jit as traced arguments (never baked-in constants), and the config is a hashable static
value shared by every compiled bucket. `flax.struct.dataclass` gives frozen pytrees with static
fields (the number of prefill tiles is one) in one declaration.

The layer loop is unrolled in Python, never `lax.scan`: a KV cache carried through a scan is
copied every step (measured: 410 ms vs 153 ms per batch-32 decode step).

A step is one token-flattened ragged batch: every token of every prefill chunk and decode row
in one [T] axis, so the projections and the MLP are one matmul for the whole step. Attention
per layer writes this step's K/V into the pages at `slot_ids` first, then attends over each
row's own pages (`models.attention`, which also defines the rows). Page 0 is the padding page:
pad tokens write there. Compute runs in cfg.dtype; RMSNorm, softmax and logits in float32.
Weights may be quantized (`models.quant`): every product goes through `quant.matmul`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import quant, rope
from models.attention import QUERY_TILE, AttentionBatch, Backend, backend_for
from models.config import ModelConfig
from models.weights import Layer, Weights

PAD_PAGE = 0


@flax.struct.dataclass
class KVCache:
    """Paged keys and values, a tuple of arrays per layer (in the backend's `KVLayout`) so
    each is donated and updated in place."""

    layers: list[tuple[jax.Array, ...]]


@flax.struct.dataclass
class StepInput:
    """One step's flat tokens and where their keys go / come from; built on the host."""

    tokens: jax.Array  # [T] int32, pad tokens any id
    positions: jax.Array  # [T] int32 absolute position of each token (pad: 0)
    slot_ids: jax.Array  # [T] int32 flat slot page*S+offset for the token's K/V (pad: page 0)
    attention: AttentionBatch  # the rows: page tables, KV lengths, query counts


def init_kv_cache(
    cfg: ModelConfig,
    num_pages: int,
    page_size: int,
    sharding: jax.sharding.Sharding | None = None,
    backend: Backend | None = None,
) -> KVCache:
    """A zeroed cache of `num_pages` pages (page 0 included) in cfg.dtype, laid out for
    `backend` (default: this platform's).

    The arrays are committed (to `sharding`, by default the default device), like a jitted
    step's outputs, so the first step and every later one hit the same compiled executable.
    """
    backend = backend or backend_for()
    layout = backend.layout
    shape = backend.cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    dtype, where = jnp.dtype(cfg.dtype), sharding or jax.devices()[0]
    return KVCache(
        layers=[
            tuple(jnp.zeros(shape, dtype, device=where) for _ in range(layout.arrays))
            for _ in range(cfg.num_layers)
        ]
    )


def forward(
    weights: Weights, cfg: ModelConfig, step: StepInput, kv: KVCache, backend: Backend | None = None
) -> tuple[jax.Array, KVCache]:
    """Hidden states [T, D] after the final norm, and the cache with this step's K/V."""
    backend = backend or backend_for()
    x_TxD = quant.take_rows(weights.embed, step.tokens, jnp.dtype(cfg.dtype))
    cos_TxDh, sin_TxDh = (a[0] for a in rope.cos_sin(cfg, step.positions[None]))
    new_layers = []
    for layer, pages in zip(weights.layers, kv.layers, strict=True):
        h_TxD = _rms_norm(x_TxD, layer.attn_norm, cfg.rms_norm_eps)
        attn_TxD, pages = _attention(layer, cfg, backend, h_TxD, cos_TxDh, sin_TxDh, step, pages)
        x_TxD = x_TxD + attn_TxD
        x_TxD = x_TxD + _mlp(layer, _rms_norm(x_TxD, layer.mlp_norm, cfg.rms_norm_eps))
        new_layers.append(pages)
    return _rms_norm(x_TxD, weights.final_norm, cfg.rms_norm_eps), KVCache(layers=new_layers)


def logits(weights: Weights, cfg: ModelConfig, hidden_xD: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of final-norm hidden states [..., D] (tied head uses `embed`)."""
    if weights.lm_head is None:
        return quant.head_logits(hidden_xD, weights.embed, tied=True)
    return quant.head_logits(hidden_xD, weights.lm_head, tied=False)


def _rms_norm(x_TxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalize in float32, cast back, then scale."""
    x32 = x_TxD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x_TxD.dtype) * scale_D[None, :]


def _attention(
    layer: Layer,
    cfg: ModelConfig,
    backend: Backend,
    x_TxD: jax.Array,
    cos_TxDh: jax.Array,
    sin_TxDh: jax.Array,
    step: StepInput,
    pages: tuple[jax.Array, ...],
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Self-attention output [T, D] and the layer's updated pages."""
    with jax.named_scope("attention"):
        t = x_TxD.shape[0]
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = quant.matmul(x_TxD, layer.wq)
        kx = quant.matmul(x_TxD, layer.wk)
        vx = quant.matmul(x_TxD, layer.wv)
        if layer.bq is not None:
            q = q + layer.bq[None, :]
            kx = kx + layer.bk[None, :]
            vx = vx + layer.bv[None, :]
        q_TxHxDh = rope.apply(q.reshape(1, t, h, dh), cos_TxDh[None], sin_TxDh[None])[0]
        k_TxKxDh = rope.apply(kx.reshape(1, t, k, dh), cos_TxDh[None], sin_TxDh[None])[0]
        v_TxKxDh = vx.reshape(t, k, dh)
        pages = backend.write(pages, step.slot_ids, k_TxKxDh, v_TxKxDh)
        out_TxHxDh = backend.attend(q_TxHxDh, pages, step.attention, kv_heads=k)
        return quant.matmul(out_TxHxDh.reshape(t, h * dh), layer.wo), pages


def _mlp(layer: Layer, x_TxD: jax.Array) -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    with jax.named_scope("mlp"):
        gate_TxF = jax.nn.silu(quant.matmul(x_TxD, layer.w_gate))
        return quant.matmul(gate_TxF * quant.matmul(x_TxD, layer.w_up), layer.w_down)


def single_sequence_step(
    tokens: Sequence[int], start: int, page_size: int, num_row_pages: int, pad_to: int = 0
) -> StepInput:
    """A step for `tokens` at positions start.. of one sequence on pages 1..num_row_pages.

    For tests and `tfjax generate`: the cache needs num_row_pages + 1 pages (page 0 is padding).
    One token is a decode row; more (or `pad_to` > 1) are prefill tiles, pad tokens (id 0,
    position 0, writing into page 0) extending T to a multiple of QUERY_TILE >= pad_to. The
    hidden state of token i is row i of `forward`'s output.
    """
    if start + len(tokens) > num_row_pages * page_size:
        raise ValueError(f"{start + len(tokens)} tokens exceed {num_row_pages} pages")
    n = len(tokens)
    positions = np.arange(start, start + n, dtype=np.int32)
    slots = (1 + positions // page_size) * page_size + positions % page_size
    table = np.arange(1, num_row_pages + 1, dtype=np.int32)
    if n == 1 and pad_to <= 1:
        return StepInput(
            tokens=np.asarray(tokens, np.int32),
            positions=positions,
            slot_ids=slots.astype(np.int32),
            attention=AttentionBatch(
                page_table=table[None],
                kv_lens=np.asarray([start + 1], np.int32),
                q_lens=np.ones(1, np.int32),
                num_tiles=0,
            ),
        )
    num_tiles = -(-max(n, pad_to) // QUERY_TILE)
    total = num_tiles * QUERY_TILE
    q_lens = np.clip(n - QUERY_TILE * np.arange(num_tiles), 0, QUERY_TILE).astype(np.int32)
    kv_lens = start + QUERY_TILE * np.arange(num_tiles, dtype=np.int32) + q_lens
    return StepInput(
        tokens=np.pad(np.asarray(tokens, np.int32), (0, total - n)),
        positions=np.pad(positions, (0, total - n)),
        slot_ids=np.pad(slots.astype(np.int32), (0, total - n), constant_values=PAD_PAGE),
        attention=AttentionBatch(
            page_table=np.tile(table, (num_tiles, 1)),
            kv_lens=np.where(q_lens > 0, kv_lens, 1).astype(np.int32),
            q_lens=q_lens,
            num_tiles=num_tiles,
        ),
    )
