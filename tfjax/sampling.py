"""Token sampling on the device: per-row greedy, temperature, top-k and top-p.

Runs inside the runner's jitted step, so logits never leave the device; only the chosen token
ids [B] do. Per-row parameters are arrays (not static), so one compiled step serves any mix of
requests. The key of output token j of a request is `fold_in(PRNGKey(seed), j)`: a request's
samples depend on its own seed and position only, never on its batch neighbours.

When every row is greedy (the common benchmark case) a `lax.cond` skips the vocabulary sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.tree_util import register_dataclass


@register_dataclass
@dataclass
class SamplingInput:
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    seed: jax.Array  # [B] uint32
    output_index: jax.Array  # [B] int32, index j of the token being sampled


def _sample_rows(logits_BxV: jax.Array, params: SamplingInput) -> jax.Array:
    vocab = logits_BxV.shape[-1]
    temperature_B = jnp.maximum(params.temperature, 1e-6)
    scaled_BxV = logits_BxV / temperature_B[:, None]
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    # top-k: keep logits >= the k-th largest.
    k_B = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth_B = jnp.take_along_axis(sorted_BxV, (k_B - 1)[:, None], axis=-1)[:, 0]
    # top-p: keep the smallest prefix of sorted tokens whose mass reaches p (at least one).
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < params.top_p[:, None]
    num_keep_B = jnp.maximum(jnp.sum(keep_BxV, axis=-1), 1)
    pth_B = jnp.take_along_axis(sorted_BxV, (num_keep_B - 1)[:, None], axis=-1)[:, 0]
    threshold_B = jnp.maximum(kth_B, pth_B)
    masked_BxV = jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)

    def draw(seed, index, row_V):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.categorical(key, row_V)

    sampled_B = jax.vmap(draw)(params.seed, params.output_index, masked_BxV)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    return jnp.where(params.temperature > 0, sampled_B, greedy_B)


def sample(logits_BxV: jax.Array, params: SamplingInput) -> jax.Array:
    """Next token id per row, int32 [B]."""
    with jax.named_scope("sampling"):
        logits_BxV = logits_BxV.astype(jnp.float32)
        tokens_B = jax.lax.cond(
            jnp.any(params.temperature > 0),
            _sample_rows,
            lambda logits, _: jnp.argmax(logits, axis=-1),
            logits_BxV,
            params,
        )
        return tokens_B.astype(jnp.int32)
