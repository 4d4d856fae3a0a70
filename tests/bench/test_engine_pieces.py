"""`tfjax bench engine pieces`: each piece runs the engine's own code on the step's data, and
its floor is the one the module documents."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import quant
from models.attention import backend_for
from models.weights import init_random, num_bytes
from tfjax.bench import engine_pieces as pieces
from tfjax.bench.engine import SMOLLM2_135M
from tfjax.bench.floors import Floors
from tfjax.runner import kv_bytes_per_token

TINY = dataclasses.replace(
    SMOLLM2_135M, vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8,
)  # fmt: skip
FLOORS = Floors(bandwidth=1e9, flops=1e10, weight_bytes=0)


def test_attention_piece_is_the_backend_on_scattered_pages() -> None:
    piece = pieces.attention_piece(TINY, "cpu", batch=3, context=37, page_size=8, floors=FLOORS)
    q_LxBxHxDh, layers, attention = piece.inputs
    assert sorted(np.asarray(attention.page_table).ravel().tolist()) == list(range(1, 16))
    assert np.asarray(attention.kv_lens).tolist() == [37] * 3
    reference = backend_for("reference")
    for out, q, layer in zip(piece.run(*piece.inputs), q_LxBxHxDh, layers, strict=True):
        expected = reference.attend(q, layer, attention, kv_heads=TINY.num_kv_heads)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert piece.floor_s == pytest.approx(3 * 37 * kv_bytes_per_token(TINY) / 1e9)


@pytest.mark.parametrize("mode", ["none", "w8a8"])
def test_product_pieces_chain_the_layers_products(mode: str) -> None:
    weights = init_random(TINY, jax.random.key(0))
    if mode != "none":
        weights = quant.quantize(weights, mode, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    products, head = pieces.product_pieces(TINY, weights, mode, batch=2, floors=FLOORS)
    _, x = products.inputs
    expected = x
    for layer in weights.layers:
        w = {
            name: np.asarray(quant.dequantize(getattr(layer, name))) for name in quant.LINEAR_FIELDS
        }
        side = (expected @ w["wk"]).sum() + (expected @ w["wv"]).sum()
        expected = expected + (expected @ w["wq"]) @ w["wo"] + side
        gate = expected @ w["w_gate"]
        expected = expected + (gate / (1 + np.exp(-gate)) * (expected @ w["w_up"])) @ w["w_down"]
    # w8a8 also rounds the activations to int8 per token: a coarser match.
    tolerance = 1e-4 if mode == "none" else 5e-2
    np.testing.assert_allclose(products.run(*products.inputs), expected, rtol=tolerance,
                               atol=tolerance)  # fmt: skip
    assert head.run(*head.inputs).shape == (2, TINY.vocab_size)
    # The floor: the longer of reading the (quantized) weights and multiplying by them.
    params = sum(np.prod(getattr(layer, name).shape) for layer in weights.layers
                 for name in quant.LINEAR_FIELDS)  # fmt: skip
    read_s, compute_s = num_bytes(weights.layers) / 1e9, 2 * 2 * params / 1e10
    assert products.floor_s == pytest.approx(max(read_s, compute_s))
    assert products.bound == ("read" if read_s >= compute_s else "compute")
    assert head.floor_s == pytest.approx(max(num_bytes(weights.embed) / 1e9,
                                             2 * 2 * 97 * 32 / 1e10))  # fmt: skip


def test_time_pieces_times_every_call_after_the_first() -> None:
    calls = []
    piece = pieces.Piece("p", 1, "none", lambda x: calls.append(x) or jnp.zeros(()), (7,), 1.0,
                         "read")  # fmt: skip
    times = pieces.time_pieces([piece, piece], rounds=2, calls=3)
    assert [len(t) for t in times] == [6, 6]
    assert len(calls) == 2 + 2 * 2 * 3  # one untimed first call each
