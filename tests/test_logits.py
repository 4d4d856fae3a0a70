"""`logit_bias` and the penalties on the device equal a plain numpy implementation of vLLM's
definitions, row by row, over random histories, under jit and eagerly; rows without them are
left bit-identical. Min-p keeps exactly the tokens at least min_p times as likely as the top."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfjax.logits import PenaltyInput, apply_penalties
from tfjax.request import SamplingParams
from tfjax.sampling import SamplingInput, sample

VOCAB = 64
HISTORY = 40


def numpy_penalties(
    logits_V: np.ndarray, prompt: Sequence[int], output: Sequence[int], params: SamplingParams
) -> np.ndarray:
    """vLLM's order: bias, repetition (prompt or output), frequency, presence."""
    out = logits_V.astype(np.float32).copy()
    for token, bias in params.logit_bias:
        out[token] += bias
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(out)).astype(np.float32)
    seen = (np.bincount(np.asarray(prompt, np.int64), minlength=len(out)) > 0) | (counts > 0)
    r = np.float32(params.repetition_penalty)
    out = np.where(seen, np.where(out > 0, out / r, out * r), out)
    out = out - np.float32(params.frequency_penalty) * counts
    return out - np.float32(params.presence_penalty) * (counts > 0)


def penalty_input(rows: list[tuple[list[int], list[int], SamplingParams]]) -> PenaltyInput:
    p = PenaltyInput.neutral(len(rows), HISTORY)
    for row, (prompt, output, params) in enumerate(rows):
        if not params.has_penalties:
            continue
        tokens = prompt + output
        p.history[row, : len(tokens)] = tokens
        p.num_prompt_tokens[row], p.num_tokens[row] = len(prompt), len(tokens)
        p.presence[row] = params.presence_penalty
        p.frequency[row] = params.frequency_penalty
        p.repetition[row] = params.repetition_penalty
        for i, (token, bias) in enumerate(params.logit_bias):
            p.bias_ids[row, i], p.bias[row, i] = token, bias
    return p


def random_row(rng: np.random.Generator) -> tuple[list[int], list[int], SamplingParams]:
    num_prompt = int(rng.integers(1, 20))
    num_output = int(rng.integers(0, HISTORY - num_prompt))
    tokens = rng.integers(0, VOCAB // 2, num_prompt + num_output).tolist()  # repeats likely
    bias_ids = rng.choice(VOCAB, int(rng.integers(0, 6)), replace=False)
    params = SamplingParams(
        presence_penalty=float(rng.uniform(-2, 2)) * int(rng.integers(0, 2)),
        frequency_penalty=float(rng.uniform(-2, 2)) * int(rng.integers(0, 2)),
        repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
        logit_bias=tuple((int(t), float(rng.uniform(-100, 100))) for t in bias_ids),
    )
    return tokens[:num_prompt], tokens[num_prompt:], params


@pytest.mark.parametrize("jit", [True, False])
def test_penalties_match_numpy(jit: bool) -> None:
    rng = np.random.default_rng(0)
    apply = jax.jit(apply_penalties) if jit else apply_penalties
    for _ in range(5):
        rows = [random_row(rng) for _ in range(8)]
        logits = rng.normal(0, 3, (8, VOCAB)).astype(np.float32)
        got = np.asarray(apply(jnp.asarray(logits), penalty_input(rows)))
        for row, (prompt, output, params) in enumerate(rows):
            want = numpy_penalties(logits[row], prompt, output, params)
            np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-5)
            if not params.has_penalties:
                assert np.array_equal(got[row], logits[row])


def test_repetition_penalty_counts_prompt_tokens_and_signs() -> None:
    logits = np.array([[2.0, -2.0, 2.0, -2.0]], np.float32)
    params = SamplingParams(repetition_penalty=2.0)
    p = penalty_input([([0], [1], params)])
    got = np.asarray(apply_penalties(jnp.asarray(logits), p))
    assert got.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_min_p_keeps_tokens_near_the_top() -> None:
    """40 rows of the same distribution, each with its own seed: one sampler call."""
    n = 40
    probs = np.array([0.5, 0.3, 0.12, 0.08], np.float32)
    logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs), (n, 4)))
    params = SamplingInput(
        temperature=jnp.ones(n),
        top_k=jnp.zeros(n, jnp.int32),
        top_p=jnp.ones(n),
        min_p=jnp.full(n, 0.5),  # keeps p >= 0.25: tokens 0 and 1
        seed=jnp.arange(n, dtype=jnp.uint32),
        output_index=jnp.zeros(n, jnp.int32),
        allowed=jnp.full((n, 1), -1, jnp.int32),
        constrained=jnp.zeros(n, bool),
    )
    assert set(np.asarray(jax.jit(sample)(logits, params)).tolist()) == {0, 1}
