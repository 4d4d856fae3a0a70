"""Rotary position embeddings in HF's rotate-half layout, with Llama 3.1 frequency scaling.

The inverse frequencies are computed in float32 exactly as HF transformers does
(`theta ** (arange(0, Dh, 2) / Dh)`, then the llama3 wavelength bands), because the logits are
checked against HF to 1e-4 and position * inv_freq at position 8k amplifies any difference.
The frequencies are numpy constants folded into the jitted step; cos/sin are computed per
token from `positions`, so any position mix (prefill chunks, decode rows) shares one code path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[Dh/2] float32 inverse frequencies, with llama3 scaling when the config has it."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_freq_wavelen, freq / scaling.factor, freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def cos_sin(cfg: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, Dh] in cfg.dtype for the given absolute positions."""
    angles_BxTxHalf = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq(cfg)[None, None, :]
    angles_BxTxDh = jnp.concatenate([angles_BxTxHalf, angles_BxTxHalf], axis=-1)
    dtype = jnp.dtype(cfg.dtype)
    return jnp.cos(angles_BxTxDh).astype(dtype), jnp.sin(angles_BxTxDh).astype(dtype)


def apply(x_BxTxNxDh: jax.Array, cos_BxTxDh: jax.Array, sin_BxTxDh: jax.Array) -> jax.Array:
    """Rotate each head of x (N heads) by its token's angles: x*cos + rotate_half(x)*sin."""
    half = x_BxTxNxDh.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxDh[..., half:], x_BxTxNxDh[..., :half]], axis=-1)
    cos, sin = cos_BxTxDh[:, :, None, :], sin_BxTxDh[:, :, None, :]
    return x_BxTxNxDh * cos + rotated * sin
