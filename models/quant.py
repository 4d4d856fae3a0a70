"""Quantized weights, kept quantized on the device and widened only inside the jitted step.

Modes (`--quantization`, vLLM's flag name; `models.config.QUANTIZATIONS`; None: float):
- `int8`: every linear weight, the embedding and an untied LM head become a `qwix.QArray` of
  int8 values with one float scale per output channel (per vocab row for the embedding, which
  is the output channel of a tied head). Norm scales and q/k/v biases stay float: a few KB.
  Each product dequantizes the weight in the step (`qwix.dot`). XLA:CPU writes the widened
  weight out before its YNNPACK dot (seen in the optimized HLO), so on CPU this saves device
  memory, not bytes read per step. On an H200 the int8 and fp8 decode steps of an 8B shape
  take about twice bfloat16's (README's GPU section): not profiled yet.
- `fp8`: as `int8` with float8_e4m3fn values (scale = absmax / 448): 3 mantissa bits, so a
  relative error up to 2^-4 per weight instead of int8's absolute half step. Storage only:
  the product dequantizes to the activations' dtype first (no fp8 dot).
- `w8a8`: `int8`'s weights wrapped in `Int8Dot`, whose products also quantize their input
  per token (absmax, dynamic) so the dot is int8 x int8 -> int32; XLA:CPU runs that through
  YNNPACK reading the int8 weight as it is. Per-token scales make a row's inputs independent
  of its neighbours, but not bit-stable: the float path's last-bit differences between step
  shapes can cross a rounding step, so tokens may change with the batch (unlike `int8`).
- `gguf`: a GGUF file's Q8_0 tensors stay int8 with one scale per block of 32 inputs (a
  `QArray` with tiled scales) and its Q4_1 tensors stay 4-bit values with a float16 scale and
  minimum per block (`AffineBlocks`); other tensor types load as float. Dequantizing either
  gives gguf-py's float32 dequantization exactly (`models.loaders.gguf` builds them).

Weight-shaped arrays (`[in, out]` linear weights, `[V, D]` embedding) may therefore be any of
`Weight`'s types; `models.llama` multiplies through `matmul`, `head_logits` and `take_rows`,
which leave plain arrays on the float code path they always had.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import Sharding

from models.weights import Layer, Weights

LINEAR_FIELDS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
GGUF_BLOCK = 32  # values per Q8_0 / Q4_1 block, along the input axis
VALUE_TYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "w8a8": jnp.int8}


@flax.struct.dataclass
class Int8Dot:
    """An int8 weight whose products quantize their input per token too (`w8a8`)."""

    weight: qwix.QArray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape


@flax.struct.dataclass
class AffineBlocks:
    """GGUF Q4_1 as stored: value = scale * q + offset, per block of `GGUF_BLOCK` along one axis.

    `scale` and `offset` have the weight's shape with the blocked axis divided by the block
    size; they stay float16 (as in the file) and widen to float32 exactly before use.
    """

    q: jax.Array  # uint8 in 0..15, the weight's shape
    scale: jax.Array  # float16, one per block
    offset: jax.Array  # float16, one per block

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """scale * q + offset in float32 (gguf-py's arithmetic, rounded the same), as `dtype`."""
        f32 = jnp.float32
        scale, offset = (_expand(a.astype(f32), self.q.shape) for a in (self.scale, self.offset))
        return (scale * self.q.astype(f32) + offset).astype(dtype)


Weight = jax.Array | qwix.QArray | Int8Dot | AffineBlocks
QUANTIZED_TYPES = (qwix.QArray, Int8Dot, AffineBlocks)


def is_quantized(node: object) -> bool:
    """Whether `node` is one quantized weight (a leaf when flattening a `Weights` tree by
    weight rather than by array)."""
    return isinstance(node, QUANTIZED_TYPES)


def dequantize(w: Weight, dtype: jnp.dtype | None = None) -> jax.Array:
    """The float weight `w` stands for (in the scale's dtype unless `dtype` is given)."""
    if isinstance(w, Int8Dot):
        w = w.weight
    if isinstance(w, qwix.QArray):
        out = qwix.dequantize(w)
    elif isinstance(w, AffineBlocks):
        out = w.dequantize()
    else:
        out = w
    return out if dtype is None else out.astype(dtype)


def matmul(x_TxI: jax.Array, w_IxO: Weight) -> jax.Array:
    """x @ w in x's dtype."""
    if isinstance(w_IxO, jax.Array | np.ndarray):
        return x_TxI @ w_IxO
    return _contract(x_TxI, w_IxO, weight_axis=0).astype(x_TxI.dtype)


def head_logits(hidden_xD: jax.Array, w: Weight, *, tied: bool) -> jax.Array:
    """Float32 logits [..., V]: `w` is the embedding [V, D] when `tied`, else lm_head [D, V]."""
    if isinstance(w, jax.Array | np.ndarray):
        spec = "...d,vd->...v" if tied else "...d,dv->...v"
        return jnp.einsum(spec, hidden_xD, w, preferred_element_type=jnp.float32)
    return _contract(hidden_xD, w, weight_axis=1 if tied else 0, out=jnp.float32)


def take_rows(embed_VxD: Weight, ids_T: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Embedding rows [T, D] of token ids, widened to `dtype` (only the rows are dequantized)."""
    if isinstance(embed_VxD, jax.Array | np.ndarray):
        return embed_VxD[ids_T]
    if isinstance(embed_VxD, Int8Dot):
        embed_VxD = embed_VxD.weight
    num_rows = embed_VxD.shape[0]
    rows = jax.tree.map(lambda a: a[ids_T] if a.shape[0] == num_rows else a, embed_VxD)
    return dequantize(rows, dtype)


def _contract(
    x: jax.Array, w: Weight, *, weight_axis: int, out: jnp.dtype | None = None
) -> jax.Array:
    """x's last axis against `w`'s `weight_axis`; `QArray`s (int8, fp8, Q8_0) through Qwix."""
    dims = (((x.ndim - 1,), (weight_axis,)), ((), ()))
    if isinstance(w, AffineBlocks):
        return jax.lax.dot_general(x, w.dequantize(x.dtype), dims, preferred_element_type=out)
    if isinstance(w, Int8Dot):
        return _int8_product(x, w.weight, weight_axis=weight_axis, out=out)
    return qwix.dot_general(x, w, dims, preferred_element_type=out)


def _int8_product(
    x: jax.Array, w: qwix.QArray, *, weight_axis: int, out: jnp.dtype | None
) -> jax.Array:
    """`w8a8`'s product: x quantized per token, then int8 x int8. A single token is doubled:
    XLA:CPU runs an int8 product of one row through a slow path (27 ms against 1.8 ms for
    two rows of a 2048x8192 weight), and per-token scales keep the copy from changing it."""
    lead = x.shape[:-1]
    x_TxI = x.reshape(-1, x.shape[-1])
    if len(x_TxI) == 1:
        x_TxI = jnp.concatenate([x_TxI, x_TxI])
    x_q = qwix.quantize(x_TxI, jnp.int8, channelwise_axes=(0,))
    dims = (((1,), (weight_axis,)), ((), ()))
    product = qwix.dot_general(x_q, w, dims, preferred_element_type=out)
    return product[: math.prod(lead)].reshape(*lead, -1)


def quantize(weights: Weights, mode: str, sharding: Sharding) -> Weights:
    """`weights` (float, on the device) with every linear weight, the embedding and an untied
    head quantized per output channel for `mode` (a `VALUE_TYPES` key), placed on
    `sharding`. One jitted call per weight (a compile per distinct shape, no whole-model
    program); the float weights stay alive until the caller drops them, so the device holds
    both for a moment."""
    if mode not in VALUE_TYPES:
        raise ValueError(f"cannot quantize float weights to {mode!r}")

    def one(w: jax.Array, channel_axis: int) -> Weight:
        q = _per_channel(w, VALUE_TYPES[mode], channel_axis=channel_axis, sharding=sharding)
        return Int8Dot(q) if mode == "w8a8" else q

    def layer(old: Layer) -> Layer:
        fields = {name: one(getattr(old, name), 1) for name in LINEAR_FIELDS}
        return dataclasses.replace(old, **fields)

    return Weights(
        embed=one(weights.embed, 0),
        layers=[layer(old) for old in weights.layers],
        final_norm=weights.final_norm,
        lm_head=None if weights.lm_head is None else one(weights.lm_head, 1),
    )


@partial(jax.jit, static_argnames=("value_type", "channel_axis", "sharding"))
def _per_channel(
    w: jax.Array, value_type: jnp.dtype, *, channel_axis: int, sharding: Sharding
) -> qwix.QArray:
    q = qwix.quantize(w, value_type, channelwise_axes=(channel_axis,))
    return jax.lax.with_sharding_constraint(q, sharding)


def _expand(per_block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Repeat each block's value over its block, back to the weight's `shape`."""
    for axis, (n, size) in enumerate(zip(per_block.shape, shape, strict=True)):
        if n != size:
            per_block = jnp.repeat(per_block, size // n, axis=axis)
    return per_block
