"""Logit processing before sampling: `logit_bias` and vLLM's three penalties, on the device.

Definitions and order are vLLM's (its sampler's `apply_penalties`), so clients moving from vLLM
get the same distribution:

    logits[t] += logit_bias[t]
    seen in prompt or output:  logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    logits[t] -= frequency_penalty * (times t was generated)
    logits[t] -= presence_penalty * (t was generated at all)

Temperature, `min_p`, top-k and top-p follow in `tfjax.sampling`.

Per-row token counts are built here, on the device, from each row's token history (prompt then
output, padded to the model's context `H`), so the host sends ids, not a [B, V] table. The
history's width is fixed per runner, so a batch with penalties has one compiled shape per row
bucket too; a batch without any penalised row does not build a `PenaltyInput` at all and runs
the sampler compiled without this code (`tfjax.executables`), paying nothing for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import register_dataclass

MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI's API allows


@register_dataclass
@dataclass
class PenaltyInput:
    history: jax.Array  # [B, H] int32, prompt then output ids; pad ids beyond num_tokens
    num_prompt_tokens: jax.Array  # [B] int32
    num_tokens: jax.Array  # [B] int32, prompt + output; 0 for rows without penalties
    presence: jax.Array  # [B] float32, 0 = off
    frequency: jax.Array  # [B] float32, 0 = off
    repetition: jax.Array  # [B] float32, 1 = off
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32, pad entries have bias 0
    bias: jax.Array  # [B, MAX_LOGIT_BIAS] float32

    @classmethod
    def neutral(cls, num_rows: int, history_len: int) -> PenaltyInput:
        """Host arrays for `num_rows` rows with every bias and penalty off."""
        return cls(
            history=np.zeros((num_rows, history_len), np.int32),
            num_prompt_tokens=np.zeros(num_rows, np.int32),
            num_tokens=np.zeros(num_rows, np.int32),
            presence=np.zeros(num_rows, np.float32),
            frequency=np.zeros(num_rows, np.float32),
            repetition=np.ones(num_rows, np.float32),
            bias_ids=np.zeros((num_rows, MAX_LOGIT_BIAS), np.int32),
            bias=np.zeros((num_rows, MAX_LOGIT_BIAS), np.float32),
        )


def token_counts(p: PenaltyInput, vocab: int) -> tuple[jax.Array, jax.Array]:
    """(output counts [B, V] float32, seen in the prompt [B, V] bool). Pad positions add 0."""
    num_rows, width = p.history.shape
    pos_BxH = jnp.arange(width, dtype=jnp.int32)[None, :]
    in_output_BxH = (pos_BxH >= p.num_prompt_tokens[:, None]) & (pos_BxH < p.num_tokens[:, None])
    in_prompt_BxH = pos_BxH < jnp.minimum(p.num_prompt_tokens, p.num_tokens)[:, None]
    rows_BxH = jnp.broadcast_to(jnp.arange(num_rows)[:, None], p.history.shape)
    zeros_BxV = jnp.zeros((num_rows, vocab), jnp.float32)
    output_BxV = zeros_BxV.at[rows_BxH, p.history].add(in_output_BxH.astype(jnp.float32))
    prompt_BxV = zeros_BxV.at[rows_BxH, p.history].add(in_prompt_BxH.astype(jnp.float32))
    return output_BxV, prompt_BxV > 0


def apply_penalties(logits_BxV: jax.Array, p: PenaltyInput) -> jax.Array:
    """`logits_BxV` (float32) with bias and penalties applied; rows with all of them off are
    returned unchanged."""
    with jax.named_scope("penalties"):
        num_rows, vocab = logits_BxV.shape
        rows_BxK = jnp.broadcast_to(jnp.arange(num_rows)[:, None], p.bias_ids.shape)
        logits_BxV = logits_BxV.at[rows_BxK, p.bias_ids].add(p.bias)
        output_BxV, in_prompt_BxV = token_counts(p, vocab)
        seen_BxV = in_prompt_BxV | (output_BxV > 0)
        r_Bx1 = p.repetition[:, None]
        repeated_BxV = jnp.where(logits_BxV > 0, logits_BxV / r_Bx1, logits_BxV * r_Bx1)
        logits_BxV = jnp.where(seen_BxV, repeated_BxV, logits_BxV)
        logits_BxV = logits_BxV - p.frequency[:, None] * output_BxV
        return logits_BxV - p.presence[:, None] * (output_BxV > 0)
