"""The paged decoder on random weights: chunked prefill, batching with padding, RoPE, shapes.

Everything runs jitted (as the engine runs it); the eager path is covered by test_vs_hf.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, rope, weights
from models.config import ModelConfig, RopeScaling

TINY = ModelConfig(
    architecture="qwen2",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
    max_position_embeddings=128,
    tie_word_embeddings=True,
    attention_bias=True,
)
PAGE_SIZE = 3  # so that 8-token chunks end mid-page
ROW_PAGES = 6  # pages 1..6 hold the 16 tokens; page 0 is padding
TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, TINY.vocab_size, 16)]


jit_forward = jax.jit(llama.forward, static_argnames=("cfg",), donate_argnames=("kv",))


def _step(tokens: list[int], start: int) -> llama.StepInput:
    return llama.single_sequence_step(tokens, start, PAGE_SIZE, ROW_PAGES)


def _kv(cfg: ModelConfig = TINY) -> llama.KVCache:
    return llama.init_kv_cache(cfg, ROW_PAGES + 1, PAGE_SIZE)


@pytest.fixture(scope="module")
def tiny_weights() -> weights.Weights:
    return weights.init_random(TINY, jax.random.key(0), scale=0.3)


def test_two_chunks_equal_one_pass(tiny_weights) -> None:
    """The second chunk attends to the first chunk's cached pages (split mid-page)."""
    whole, _ = jit_forward(tiny_weights, TINY, _step(TOKENS, 0), _kv())
    first, kv = jit_forward(tiny_weights, TINY, _step(TOKENS[:8], 0), _kv())
    second, _ = jit_forward(tiny_weights, TINY, _step(TOKENS[8:], 8), kv)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5)


def test_decode_token_by_token_equals_one_pass(tiny_weights) -> None:
    whole, _ = jit_forward(tiny_weights, TINY, _step(TOKENS, 0), _kv())
    kv, rows = _kv(), []
    for pos, token in enumerate(TOKENS):
        hidden, kv = jit_forward(tiny_weights, TINY, _step([token], pos), kv)
        rows.append(hidden)
    np.testing.assert_allclose(np.concatenate(rows, axis=1), whole, atol=1e-5)


def test_batch_with_pad_tokens_and_pad_row(tiny_weights) -> None:
    """Rows on scattered pages, a shorter row padded, a pad row: each real row as if alone."""
    a, b = TOKENS, TOKENS[3:8]
    alone_a, _ = jit_forward(tiny_weights, TINY, _step(a, 0), _kv())
    alone_b, _ = jit_forward(tiny_weights, TINY, _step(b, 0), _kv())
    # Row 0 on pages in a scattered order, row 1 on 2 pages, row 2 is a pad row.
    pages = np.array([[5, 2, 12, 7, 9, 1], [3, 11, 0, 0, 0, 0], [0] * 6], dtype=np.int32)
    positions = np.zeros((3, 16), dtype=np.int32)
    positions[0] = np.arange(16)
    positions[1, :5] = np.arange(5)
    slots = np.tile(np.arange(16, dtype=np.int32) % PAGE_SIZE, (3, 1))  # pads: page 0
    for row, n in ((0, 16), (1, 5)):
        offsets = np.arange(n)
        slots[row, :n] = pages[row, offsets // PAGE_SIZE] * PAGE_SIZE + offsets % PAGE_SIZE
    step = llama.StepInput(
        tokens=jnp.asarray([a, b + [0] * 11, [0] * 16], dtype=jnp.int32),
        positions=jnp.asarray(positions),
        slot_ids=jnp.asarray(slots),
        page_table=jnp.asarray(pages),
        kv_lens=jnp.asarray([16, 5, 0], dtype=jnp.int32),
    )
    hidden, _ = jit_forward(tiny_weights, TINY, step, llama.init_kv_cache(TINY, 13, PAGE_SIZE))
    np.testing.assert_allclose(hidden[0], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(hidden[1, :5], alone_b[0], atol=1e-5)
    assert np.isfinite(np.asarray(hidden)).all()


def test_logits_shape_and_dtype(tiny_weights) -> None:
    untied = dataclasses.replace(TINY, tie_word_embeddings=False)
    untied_weights = weights.init_random(untied, jax.random.key(1))
    for cfg, w in ((TINY, tiny_weights), (untied, untied_weights)):
        out = llama.logits(w, cfg, jnp.ones((2, 3, cfg.hidden_size), jnp.float32))
        assert out.shape == (2, 3, cfg.vocab_size) and out.dtype == jnp.float32


def test_bfloat16_forward_runs_and_roughly_agrees(tiny_weights) -> None:
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    w16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_weights)
    h16, kv = jit_forward(w16, bf16, _step(TOKENS, 0), _kv(bf16))
    h32, _ = jit_forward(tiny_weights, TINY, _step(TOKENS, 0), _kv())
    assert h16.dtype == jnp.bfloat16 and kv.k[0].dtype == jnp.bfloat16
    # bf16 weights, activations and KV: a few percent of the output scale, no more.
    assert np.abs(np.asarray(h16, np.float32) - h32).max() < 0.05 * np.abs(h32).max()


def test_llama3_rope_scaling_bands() -> None:
    """High frequencies untouched, low ones divided by the factor, monotone in between."""
    plain = rope.inv_freq(dataclasses.replace(TINY, rope_scaling=None))
    scaled = rope.inv_freq(TINY)
    assert scaled[0] == plain[0]
    np.testing.assert_allclose(scaled[-1], plain[-1] / 8.0, rtol=1e-6)
    assert np.all(np.diff(scaled) < 0)


def test_abstract_matches_init_and_is_stable() -> None:
    a, b = weights.abstract(TINY), weights.abstract(TINY)
    assert jax.tree.structure(a) == jax.tree.structure(b) and hash(TINY) == hash(
        dataclasses.replace(TINY)
    )
    init = weights.init_random(TINY, jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), init) == jax.tree.map(
        lambda x: (x.shape, x.dtype), a
    )
    assert weights.num_bytes(init) == weights.num_bytes(a)
