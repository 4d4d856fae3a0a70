"""The paged decoder on random weights: chunked prefill, batching with padding, RoPE, shapes.

Everything runs jitted (as the engine runs it); the eager path is covered by test_vs_hf.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, rope, weights
from models.attention import QUERY_TILE, AttentionBatch, backend_for
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


jit_forward = jax.jit(llama.forward, static_argnames=("cfg", "backend"), donate_argnames=("kv",))


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
    np.testing.assert_allclose(np.concatenate([first[:8], second[:8]]), whole[:16], atol=1e-5)


def test_decode_token_by_token_equals_one_pass(tiny_weights) -> None:
    whole, _ = jit_forward(tiny_weights, TINY, _step(TOKENS, 0), _kv())
    kv, rows = _kv(), []
    for pos, token in enumerate(TOKENS):
        hidden, kv = jit_forward(tiny_weights, TINY, _step([token], pos), kv)
        rows.append(hidden)
    np.testing.assert_allclose(np.concatenate(rows), whole[:16], atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ragged_step_with_pad_tokens_and_pad_row(tiny_weights, backend) -> None:
    """Two prompts as prefill tiles on scattered pages, a decode row of a third sequence and a
    pad row, all in one step: each real row as if alone."""
    a, b, c = TOKENS, TOKENS[3:8], TOKENS[:4]
    alone = [jit_forward(tiny_weights, TINY, _step(x, 0), _kv())[0] for x in (a, b, c)]
    pages = np.array([[5, 2, 12, 7, 9, 1], [3, 11, 0, 0, 0, 0], [4, 6, 0, 0, 0, 0], [0] * 6])
    kv = llama.init_kv_cache(TINY, 13, PAGE_SIZE)
    # c's first 3 tokens are cached by a step of their own; its 4th decodes beside a and b.
    first_c = _ragged([(c[:3], 0, pages[2])], [])
    _, kv = jit_forward(tiny_weights, TINY, first_c, kv, backend_for(backend))
    step = _ragged([(a, 0, pages[0]), (b, 0, pages[1])], [(c[3], 3, pages[2]), None])
    hidden, _ = jit_forward(tiny_weights, TINY, step, kv, backend_for(backend))
    np.testing.assert_allclose(hidden[:16], alone[0][:16], atol=1e-5)
    np.testing.assert_allclose(hidden[32:37], alone[1][:5], atol=1e-5)
    np.testing.assert_allclose(hidden[64], alone[2][3], atol=1e-5)
    assert np.isfinite(np.asarray(hidden)).all()


def _ragged(prefill, decode) -> llama.StepInput:
    """Prefill rows (tokens, start, pages), one tile each, then decode rows (token, position,
    pages) or None for a pad row."""
    tokens, positions, slots, tables, kv_lens, q_lens = [], [], [], [], [], []

    def row(toks, start, pages, width):
        pos = np.arange(start, start + len(toks))
        tokens.extend(list(toks) + [0] * (width - len(toks)))
        positions.extend(list(pos) + [0] * (width - len(toks)))
        slots.extend(list(pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE))
        slots.extend([0] * (width - len(toks)))
        tables.append(pages)
        kv_lens.append(start + len(toks))
        q_lens.append(len(toks))

    for toks, start, pages in prefill:
        row(toks, start, pages, QUERY_TILE)
    for entry in decode:
        if entry is None:
            tokens.append(0), positions.append(0), slots.append(0), tables.append([0] * 6)
            kv_lens.append(1), q_lens.append(0)
        else:
            row([entry[0]], entry[1], entry[2], 1)
    as_array = partial(np.asarray, dtype=np.int32)
    return llama.StepInput(
        tokens=as_array(tokens),
        positions=as_array(positions),
        slot_ids=as_array(slots),
        attention=AttentionBatch(
            page_table=as_array(tables),
            kv_lens=as_array(kv_lens),
            q_lens=as_array(q_lens),
            num_tiles=len(prefill),
        ),
    )


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
    assert h16.dtype == jnp.bfloat16 and kv.layers[0][0].dtype == jnp.bfloat16
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
