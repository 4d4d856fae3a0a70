"""The sampler's three branches (all greedy, unfiltered sampling, top-k/top-p) agree row by row:
a request's token never depends on which branch its batch neighbours select."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.sampling import SamplingInput, sample

VOCAB = 512
SAMPLE = jax.jit(sample)  # one compile per batch size; eager calls cost a second each


def params(temperature, top_k, top_p, seed) -> SamplingInput:
    n = len(temperature)
    return SamplingInput(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k, jnp.int32),
        top_p=jnp.asarray(top_p, jnp.float32),
        min_p=jnp.zeros(n, jnp.float32),
        seed=jnp.asarray(seed, jnp.uint32),
        output_index=jnp.arange(n, dtype=jnp.int32),
        allowed=jnp.full((n, -(-VOCAB // 32)), -1, jnp.int32),
        constrained=jnp.zeros(n, bool),
    )


def test_a_plain_sampled_row_ignores_a_filtered_neighbour() -> None:
    logits = jax.random.normal(jax.random.key(0), (2, VOCAB)) * 3
    for seed in range(20):
        alone = SAMPLE(logits[:1], params([1.0], [0], [1.0], [seed]))
        crowd = SAMPLE(logits, params([1.0, 0.8], [0, 40], [1.0, 0.9], [seed, 99]))
        assert int(alone[0]) == int(crowd[0])


def test_a_greedy_row_is_the_argmax_in_every_branch() -> None:
    logits = jax.random.normal(jax.random.key(1), (3, VOCAB))
    argmax = int(jnp.argmax(logits[0]))
    batches = [
        params([0.0, 0.0, 0.0], [0, 0, 0], [1.0, 1.0, 1.0], [0, 1, 2]),
        params([0.0, 1.0, 1.0], [0, 0, 0], [1.0, 1.0, 1.0], [0, 1, 2]),
        params([0.0, 1.0, 0.5], [0, 5, 0], [1.0, 1.0, 0.5], [0, 1, 2]),
    ]
    assert [int(SAMPLE(logits, p)[0]) for p in batches] == [argmax] * 3


def test_filters_keep_draws_inside_the_allowed_set() -> None:
    logits = jax.random.normal(jax.random.key(2), (1, VOCAB)) * 2
    top5 = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    for seed in range(30):
        assert int(SAMPLE(logits, params([1.0], [5], [1.0], [seed]))[0]) in top5
        assert int(SAMPLE(logits, params([1.0], [0], [0.5], [seed]))[0]) in nucleus
    unfiltered = {int(SAMPLE(logits, params([1.0], [0], [1.0], [s]))[0]) for s in range(30)}
    assert not unfiltered <= top5  # without filters the draw leaves the top 5 at times


def test_the_grammar_mask_leaves_only_allowed_tokens() -> None:
    """Rows with a packed mask draw (greedy, plain and filtered sampling) only tokens whose
    bit is set, greedy rows the best of those; the unconstrained row keeps its own draw."""
    logits = jax.random.normal(jax.random.key(3), (4, VOCAB)) * 3
    rng = np.random.default_rng(0)
    allowed_BxV = rng.random((4, VOCAB)) < 0.05
    allowed_BxV[0] = True  # row 0 is unconstrained
    words = np.packbits(allowed_BxV, axis=1, bitorder="little").view(np.int32)
    for seed in range(10):
        p = params([1.0, 0.0, 1.0, 0.8], [0, 0, 0, 20], [1.0, 1.0, 1.0, 0.9], [seed] * 4)
        masked = SamplingInput(
            **{**p.__dict__, "allowed": jnp.asarray(words), "constrained": jnp.arange(4) > 0}
        )
        tokens = np.asarray(SAMPLE(logits, masked))
        assert all(allowed_BxV[row, t] for row, t in enumerate(tokens))
        best = np.where(allowed_BxV[1], np.asarray(logits[1]), -np.inf).argmax()
        assert tokens[1] == best
        assert tokens[0] == int(SAMPLE(logits[:1], params([1.0], [0], [1.0], [seed]))[0])
