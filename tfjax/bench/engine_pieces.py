"""`tfjax bench engine pieces`: each piece of a decode step alone, against its floor.

    tfjax bench engine pieces [--shape smollm2-135m] [--batches 1,32] [--context 160]
        [--quantizations none,w8a8] [--rounds 3] [--out out/bench_pieces]
    tfjax bench engine pieces --quantizations int8    # a widening mode, in a run of its own

`tfjax bench engine` says how far a whole decode step is from its floor; this says which part
of the step is. Each piece runs the engine's own code, jitted over all of the model's layers
with the step's data dependencies, on random weights of `--shape`:
- `products`: every linear layer of every layer through `models.quant.matmul`, chained as in
  the model (q, k, v from the layer's input, o from q, the MLP from the sum), at each batch,
  for each `--quantizations` mode (`none`: the float weights). Floor: the weights' bytes at
  the measured read bandwidth, or their FLOPs at the measured matmul rate, whichever is longer.
- `head`: the LM head (`models.llama.logits`), floored the same way.
- `attention`: the attention backend's `attend` (`--attention-backend`, the platform's by
  default) for `batch` decode rows of `--context` keys each, one KV cache per layer with pages
  scattered as a busy pool leaves them. Floor: every row's keys and values read once.
Pieces run in turn, `--rounds` times, and each figure is the median over all timed calls (the
first call of each compiles and is not timed). What the step adds around them (norms, RoPE,
KV writes, sampling, the host's work) is the whole step minus these.
Writes DIR/bench_pieces.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import llama, quant
from models.attention import AttentionBatch, backend_for
from models.config import ModelConfig
from models.weights import Weights, num_bytes
from tfjax.bench.engine import SHAPES, random_weights
from tfjax.bench.flags import HelpFormatter
from tfjax.bench.floors import Floors, matmul_flops_per_s, read_bandwidth_bytes_per_s
from tfjax.host_memory import keep_freed_memory
from tfjax.kv.pages import pages_needed
from tfjax.runner import kv_bytes_per_token


@dataclass(frozen=True)
class Piece:
    """One jitted piece of a decode step, its inputs and its floor in seconds."""

    name: str
    batch: int
    mode: str  # the weights' quantization ("none": float), or the attention backend
    run: Callable[..., jax.Array]
    inputs: tuple
    floor_s: float
    bound: str  # what the floor is: "read" or "compute"


def chained_products(weights: Weights, x_BxD: jax.Array) -> jax.Array:
    """Every layer's seven products with the model's dependencies (no attention or norms)."""
    for layer in weights.layers:
        q = quant.matmul(x_BxD, layer.wq)
        side = quant.matmul(x_BxD, layer.wk).sum() + quant.matmul(x_BxD, layer.wv).sum()
        x_BxD = x_BxD + quant.matmul(q, layer.wo) + side
        gated = jax.nn.silu(quant.matmul(x_BxD, layer.w_gate)) * quant.matmul(x_BxD, layer.w_up)
        x_BxD = x_BxD + quant.matmul(gated, layer.w_down)
    return x_BxD


def product_pieces(
    cfg: ModelConfig, weights: Weights, mode: str, batch: int, floors: Floors
) -> Iterator[Piece]:
    """The `products` and `head` pieces of one weight mode at one batch; `floors.flops`: the
    matmul rate of the dtype the products multiply in."""
    x_BxD = jnp.asarray(np.random.default_rng(0).standard_normal((batch, cfg.hidden_size)))
    x_BxD = x_BxD.astype(cfg.dtype)
    layer_params = sum(np.prod(getattr(layer, n).shape) for layer in weights.layers
                       for n in quant.LINEAR_FIELDS)  # fmt: skip
    head_weight = weights.embed if weights.lm_head is None else weights.lm_head

    def head(weights: Weights, x_BxD: jax.Array) -> jax.Array:
        return llama.logits(weights, cfg, x_BxD)

    for name, run, params, nbytes in (
        ("products", chained_products, layer_params, num_bytes(weights.layers)),
        ("head", head, np.prod(head_weight.shape), num_bytes(head_weight)),
    ):
        read_s, compute_s = nbytes / floors.bandwidth, 2 * batch * params / floors.flops
        bound = "read" if read_s >= compute_s else "compute"
        yield Piece(name, batch, mode, jax.jit(run), (weights, x_BxD), max(read_s, compute_s),
                    bound)  # fmt: skip


def decode_batch(
    batch: int, context: int, page_size: int, seed: int = 0
) -> tuple[AttentionBatch, int]:
    """(AttentionBatch of `batch` decode rows with `context` keys each, pages in the pool):
    each row's pages drawn at random from the pool, as pages freed and reused leave them."""
    width = pages_needed(context, page_size)
    num_pages = 1 + batch * width  # page 0 is the padding page
    pages = np.random.default_rng(seed).permutation(np.arange(1, num_pages)).astype(np.int32)
    return AttentionBatch(
        page_table=jnp.asarray(pages.reshape(batch, width)),
        kv_lens=jnp.full((batch,), context, jnp.int32),
        q_lens=jnp.ones((batch,), jnp.int32),
        num_tiles=0,
    ), num_pages


def attention_piece(cfg: ModelConfig, backend_name: str, batch: int, context: int,
                    page_size: int, floors: Floors) -> Piece:  # fmt: skip
    """The backend's `attend` over every layer's cache for one decode step."""
    backend = backend_for(backend_name)
    attention, num_pages = decode_batch(batch, context, page_size)
    rng = np.random.default_rng(1)
    shape = backend.cache_shape(num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    layers = [
        tuple(jnp.asarray(rng.standard_normal(shape), cfg.dtype)
              for _ in range(backend.layout.arrays))
        for _ in range(cfg.num_layers)
    ]  # fmt: skip
    q_LxBxHxDh = jnp.asarray(
        rng.standard_normal((cfg.num_layers, batch, cfg.num_heads, cfg.head_dim)), cfg.dtype
    )

    def run(q_LxBxHxDh, layers, attention):
        return [
            backend.attend(q, layer, attention, kv_heads=cfg.num_kv_heads)
            for q, layer in zip(q_LxBxHxDh, layers, strict=True)
        ]

    floor_s = batch * context * kv_bytes_per_token(cfg) / floors.bandwidth
    return Piece("attention", batch, backend.name, jax.jit(run),
                 (q_LxBxHxDh, layers, attention), floor_s, "read")  # fmt: skip


def time_pieces(pieces: list[Piece], rounds: int, calls: int) -> list[list[float]]:
    """Seconds of each timed call, pieces in turn each round (first calls compile, untimed)."""
    for piece in pieces:
        jax.block_until_ready(piece.run(*piece.inputs))
    times: list[list[float]] = [[] for _ in pieces]
    for _ in range(rounds):
        for piece, seconds in zip(pieces, times, strict=True):
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(piece.run(*piece.inputs))
                seconds.append(time.perf_counter() - start)
    return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench engine pieces", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=160, help="keys per decode row")
    parser.add_argument(
        "--quantizations",
        default="none,w8a8",
        help="weight modes of the product pieces (none: float); `int8`, `fp8` and `gguf` "
        "widen their weights in the step and get glibc's setting for that, as `tfjax serve` "
        "does, for the whole run (`tfjax.host_memory`): measure them in a run of their own",
    )
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per piece per round")
    parser.add_argument("--out", type=Path, default=Path("out/bench_pieces"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.quantizations.split(",")
    for mode in modes:  # before jax's backend starts
        keep_freed_memory(mode)
    cfg = SHAPES[args.shape]
    floors = Floors(read_bandwidth_bytes_per_s(), matmul_flops_per_s(cfg.dtype), weight_bytes=0)
    int8_floors = dataclasses.replace(floors, flops=matmul_flops_per_s("int8"))
    pieces = []
    for mode in modes:
        _, weights = random_weights(args.shape, cfg.dtype, None if mode == "none" else mode)
        for batch in batches:
            mode_floors = int8_floors if mode == "w8a8" else floors  # the others widen first
            pieces.extend(product_pieces(cfg, weights, mode, batch, mode_floors))
    for batch in batches:
        pieces.append(attention_piece(cfg, args.attention_backend, batch, args.context,
                                      args.page_size, floors))  # fmt: skip
    times = time_pieces(pieces, args.rounds, args.calls)
    rows = [
        {
            "piece": piece.name,
            "mode": piece.mode,
            "batch": piece.batch,
            "median_ms": 1e3 * statistics.median(seconds),
            "min_ms": 1e3 * min(seconds),
            "floor_ms": 1e3 * piece.floor_s,
            "bound": piece.bound,
        }
        for piece, seconds in zip(pieces, times, strict=True)
    ]
    print(f"{'piece':<10} {'mode':<5} {'batch':>5} {'median ms':>10} {'min ms':>8} "
          f"{'floor ms':>9} {'x floor':>8}  floor")  # fmt: skip
    for row in rows:
        print(f"{row['piece']:<10} {row['mode']:<5} {row['batch']:>5} {row['median_ms']:>10.2f} "
              f"{row['min_ms']:>8.2f} {row['floor_ms']:>9.2f} "
              f"{row['median_ms'] / row['floor_ms']:>8.1f}  {row['bound']}")  # fmt: skip
    print(f"floors from {floors.bandwidth / 1e9:.1f} GB/s measured read bandwidth, "
          f"{floors.flops / 1e12:.2f} TFLOP/s measured {cfg.dtype} and "
          f"{int8_floors.flops / 1e12:.2f} TOP/s int8 matmul rates (w8a8)")  # fmt: skip
    result = {"shape": args.shape, "context": args.context, "device": str(jax.devices()[0]),
              "read_bandwidth_bytes_per_s": floors.bandwidth,
              "matmul_flops_per_s": floors.flops, "int8_matmul_ops_per_s": int8_floors.flops,
              "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pieces.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_pieces.json'}", file=sys.stderr)
    return 0
