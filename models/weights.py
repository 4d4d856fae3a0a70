"""The weight pytree of a decoder: `Layer` per block, `Weights` for the whole model.

Both are `jax.tree_util.register_dataclass` pytrees, so they pass through `jit`, `device_put`
and orbax as they are. Linear weights are stored `[in, out]` (HF's `[out, in]` transposed by the
loaders) so the forward pass is `x @ w`; q/k follow HF's rotate-half RoPE layout (the GGUF loader
undoes llama.cpp's interleaving permutation). Optional tensors (q/k/v biases, an untied
`lm_head`) are `None` when the config says they are absent, which makes them empty subtrees.

`abstract(cfg)` is the one place that states every shape and dtype: the loaders check against it,
the orbax cache restores into it, and `init_random` fills it for tests and benchmarks. Letters as
in `models/llama.py`. A quantized model (`models.quant`) holds a quantized pytree (values and
scales) in place of a weight array, with the same logical shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclass
class Layer:
    """One decoder block."""

    attn_norm: jax.Array  # [D]
    wq: jax.Array  # [D, H*Dh]
    wk: jax.Array  # [D, K*Dh]
    wv: jax.Array  # [D, K*Dh]
    bq: jax.Array | None  # [H*Dh], None without attention bias
    bk: jax.Array | None  # [K*Dh]
    bv: jax.Array | None  # [K*Dh]
    wo: jax.Array  # [H*Dh, D]
    mlp_norm: jax.Array  # [D]
    w_gate: jax.Array  # [D, F]
    w_up: jax.Array  # [D, F]
    w_down: jax.Array  # [F, D]


@jax.tree_util.register_dataclass
@dataclass
class Weights:
    """The whole model; `lm_head` is None when tied to `embed`."""

    embed: jax.Array  # [V, D]
    layers: list[Layer]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None  # [D, V]


def abstract(cfg: ModelConfig) -> Weights:
    """Shapes and dtypes of every weight, as `jax.ShapeDtypeStruct` leaves."""
    dtype = jnp.dtype(cfg.dtype)
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def spec(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    def bias(n: int) -> jax.ShapeDtypeStruct | None:
        return spec(n) if cfg.attention_bias else None

    layer = Layer(
        attn_norm=spec(d),
        wq=spec(d, q),
        wk=spec(d, kv),
        wv=spec(d, kv),
        bq=bias(q),
        bk=bias(kv),
        bv=bias(kv),
        wo=spec(q, d),
        mlp_norm=spec(d),
        w_gate=spec(d, f),
        w_up=spec(d, f),
        w_down=spec(f, d),
    )
    return Weights(
        embed=spec(v, d),
        layers=[layer] * cfg.num_layers,
        final_norm=spec(d),
        lm_head=None if cfg.tie_word_embeddings else spec(d, v),
    )


@functools.partial(jax.jit, static_argnames=("cfg", "scale"))
def init_random(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Weights:
    """Random weights for tests and benchmarks: N(0, scale), plus one on the norm scales.

    One jitted draw per leaf, compiled once per distinct (shape, dtype): a model repeats a
    handful of shapes across its layers, and no leaf needs more than its own float32 noise
    (one draw cut into all the leaves needed 4 bytes per parameter at once, 32 GB for
    Llama-3-8B, and minutes of GPU compile).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract(cfg))
    arrays = []
    for i, (path, leaf) in enumerate(leaves):
        shift = 1.0 if jax.tree_util.keystr(path[-1:]).endswith("norm") else 0.0
        leaf_key = jax.random.fold_in(key, i)
        arrays.append(_normal(leaf_key, leaf.shape, jnp.dtype(leaf.dtype), scale, shift))
    return jax.tree.unflatten(treedef, arrays)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _normal(
    key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, scale: float, shift: float
) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * scale + shift).astype(dtype)


def num_bytes(weights: Weights) -> int:
    """Total bytes of all weight arrays (or of their abstract shapes)."""
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(weights))
