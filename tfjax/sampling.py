"""Token sampling on the device: per-row greedy, temperature, min-p, top-k and top-p.

Runs inside the runner's jitted step, so logits never leave the device; only the chosen token
ids [B] do. Per-row parameters are arrays (not static), so one compiled step serves any mix of
requests. The key of output token j of a request is `fold_in(PRNGKey(seed), j)`: a request's
samples depend on its own seed and position only, never on its batch neighbours.

The vocabulary sort that top-k and top-p need is the expensive part on a CPU (65 ms for 8
rows of SmolLM2's 49k vocabulary, 300 ms for 32: more than the model step), so a `lax.switch`
picks the cheapest branch that serves the whole batch: all greedy (argmax), sampling without
filters (OpenAI's defaults, temperature 1 and top_p 1: a categorical draw, no sort), or with
filters. In the filtered branch rows without filters draw from their unfiltered logits, so a
row's token is the same whichever branch its neighbours make the batch take.

`token_logprobs` scores the chosen tokens (and the likeliest alternatives) by the model's raw
log-softmax, before bias, penalties, temperature and filters (vLLM's default); the runner calls
it only in steps where some row asked for logprobs.

`logit_bias` and the penalties (`tfjax.logits`) come first when the batch has a row that asks
for them (`penalties` is then given, a separate compilation); then the grammar mask of
structured outputs (`tfjax.grammar`); then, as in vLLM, temperature, min-p (on the scaled
distribution), top-k and top-p. The mask is a packed bitmask input every step carries (the
runner passes a device-resident all-ones mask when no row is constrained), behind a
`lax.cond` on `constrained`: one compiled shape, and unconstrained batches skip the unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.tree_util import register_dataclass

from tfjax.api import TokenLogprob
from tfjax.logits import PenaltyInput, apply_penalties
from tfjax.request import MAX_TOP_LOGPROBS


@register_dataclass
@dataclass
class SamplingInput:
    temperature: jax.Array  # [B] float32, 0 = greedy
    top_k: jax.Array  # [B] int32, 0 = off
    top_p: jax.Array  # [B] float32, 1 = off
    min_p: jax.Array  # [B] float32, 0 = off
    seed: jax.Array  # [B] uint32
    output_index: jax.Array  # [B] int32, index j of the token being sampled
    # [B, ceil(V / 32)] int32, bit t % 32 of word t // 32: token t allowed. None only in host
    # inputs without a constrained row (the runner adds its all-ones device copy).
    allowed: jax.Array | None
    constrained: jax.Array  # [B] bool, the row has a grammar (its `allowed` is not all ones)


def _draw(logits_BxV: jax.Array, params: SamplingInput) -> jax.Array:
    """Sampled rows draw from `logits` (already scaled and filtered); greedy rows take the
    argmax, which the scaling keeps."""

    def draw(seed, index, row_V):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.categorical(key, row_V)

    sampled_B = jax.vmap(draw)(params.seed, params.output_index, logits_BxV)
    return jnp.where(params.temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1))


def _scaled(logits_BxV: jax.Array, params: SamplingInput) -> jax.Array:
    return logits_BxV / jnp.maximum(params.temperature, 1e-6)[:, None]


def _filters(params: SamplingInput) -> jax.Array:
    """[B] bool: the row samples with top-k or top-p."""
    return (params.temperature > 0) & ((params.top_k > 0) | (params.top_p < 1) | (params.min_p > 0))


def _sample_filtered(logits_BxV: jax.Array, params: SamplingInput) -> jax.Array:
    vocab = logits_BxV.shape[-1]
    scaled_BxV = _scaled(logits_BxV, params)
    # min-p: drop tokens less likely than min_p times the likeliest (log 0 = -inf: no cut).
    floor_B = jnp.max(scaled_BxV, axis=-1) + jnp.log(params.min_p)
    scaled_BxV = jnp.where(scaled_BxV < floor_B[:, None], -jnp.inf, scaled_BxV)
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
    dropped_BxV = _filters(params)[:, None] & (scaled_BxV < threshold_B[:, None])
    return _draw(jnp.where(dropped_BxV, -jnp.inf, scaled_BxV), params)


def allowed_only(logits_BxV: jax.Array, allowed_BxW: jax.Array) -> jax.Array:
    """`logits_BxV` with the tokens whose bit is clear in `allowed_BxW` set to -inf."""
    ids_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    bits_BxV = jnp.right_shift(allowed_BxW[:, ids_V // 32], (ids_V % 32)[None, :]) & 1
    return jnp.where(bits_BxV == 1, logits_BxV, -jnp.inf)


def sample(
    logits_BxV: jax.Array, params: SamplingInput, penalties: PenaltyInput | None = None
) -> jax.Array:
    """Next token id per row, int32 [B]."""
    with jax.named_scope("sampling"):
        logits_BxV = logits_BxV.astype(jnp.float32)
        if penalties is not None:
            logits_BxV = apply_penalties(logits_BxV, penalties)
        logits_BxV = jax.lax.cond(
            jnp.any(params.constrained),
            allowed_only,
            lambda logits, _: logits,
            logits_BxV,
            params.allowed,
        )
        branch = jnp.any(params.temperature > 0).astype(jnp.int32) + jnp.any(_filters(params))
        tokens_B = jax.lax.switch(
            branch,
            [
                lambda logits, _: jnp.argmax(logits, axis=-1),
                lambda logits, p: _draw(_scaled(logits, p), p),
                _sample_filtered,
            ],
            logits_BxV,
            params,
        )
        return tokens_B.astype(jnp.int32)


@register_dataclass
@dataclass
class TokenLogprobs:
    token: jax.Array  # [B] float32, log-probability of the sampled token
    top_ids: jax.Array  # [B, MAX_TOP_LOGPROBS] int32, likeliest tokens first
    top: jax.Array  # [B, MAX_TOP_LOGPROBS] float32


def token_logprobs(logits_BxV: jax.Array, tokens_B: jax.Array) -> TokenLogprobs:
    """The raw log-softmax of `logits_BxV` at `tokens_B`, and its top MAX_TOP_LOGPROBS."""
    with jax.named_scope("logprobs"):
        logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
        top_BxK, top_ids_BxK = jax.lax.top_k(logprobs_BxV, MAX_TOP_LOGPROBS)
        token_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
        return TokenLogprobs(token=token_B, top_ids=top_ids_BxK.astype(jnp.int32), top=top_BxK)


def row_logprob(scores: TokenLogprobs, row: int, token_id: int, num_top: int) -> TokenLogprob:
    """Row `row` of host-side `scores` (after `jax.device_get`), with `num_top` alternatives."""
    ids, logprobs = scores.top_ids[row, :num_top].tolist(), scores.top[row, :num_top].tolist()
    top = zip(ids, logprobs, strict=True)
    return TokenLogprob(token_id=token_id, logprob=float(scores.token[row]), top=tuple(top))
