"""Physical floors of a step on this machine: what no engine can beat, measured, not assumed.

A decode step cannot beat max(bytes it must read -- every weight once plus each row's KV --
/ read bandwidth, its FLOPs / matmul rate); prefill cannot beat the matmul rate / FLOPs per
token. Bandwidth and matmul rate are measured on the default device (best of a few runs), so
the floors hold for the machine the benchmark runs on. `tfjax bench engine` prints every
figure beside its floor; the GPU check (`tfjax bench gpu-check`) gates on the ratio.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from tfjax.runner import kv_bytes_per_token


def read_bandwidth_bytes_per_s(repeats: int = 5) -> float:
    """Best-of-n rate of a jitted sum over one large array on the default device: it reads the
    array once and writes nothing, as a decode step reads weights and KV.

    Not a copy: `x + 1` in place moves each byte twice, and counting both (58 GB/s on the
    2-core development VM, against 28-33 GB/s for any pure read there, summed or multiplied
    by a vector) put the CPU floor at half of what the memory can deliver."""
    size = (256 << 20) if jax.default_backend() == "cpu" else (4 << 30)
    total = jax.jit(jnp.sum)
    x = jnp.ones(size // 4, jnp.float32)
    jax.block_until_ready(total(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(total(x))
        best = min(best, time.perf_counter() - start)
    return size / best


def matmul_flops_per_s(dtype: str, n: int = 4096, repeats: int = 5) -> float:
    """Best-of-n rate of one n x n matmul in `dtype` on the default device (int8 operands
    accumulate in int32, as `w8a8`'s products do)."""
    a = jnp.ones((n, n), dtype)
    accumulate = jnp.int32 if a.dtype == jnp.int8 else None
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=accumulate))
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Matmul FLOPs of one token: 2 per weight it multiplies (the embedding is a lookup, the
    head a matmul) plus attention's QK and PV over `context` keys."""
    d, f, h, k, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim)  # fmt: skip
    weights_per_layer = 2 * d * h * dh + 2 * d * k * dh + 3 * d * f  # q, o, k, v, MLP
    per_layer = 2 * weights_per_layer + 4 * h * dh * context
    return float(cfg.num_layers * per_layer + 2 * d * cfg.vocab_size)


@dataclasses.dataclass(frozen=True)
class Floors:
    bandwidth: float  # bytes/s
    flops: float  # matmul FLOP/s
    weight_bytes: int

    def decode_read_s(self, cfg: ModelConfig, batch: int, context: int) -> float:
        """Every weight and each row's KV read once (the HBM floor on a GPU)."""
        return (self.weight_bytes + batch * context * kv_bytes_per_token(cfg)) / self.bandwidth

    def decode_step_s(self, cfg: ModelConfig, batch: int, context: int) -> float:
        compute_s = batch * flops_per_token(cfg, context) / self.flops
        return max(self.decode_read_s(cfg, batch, context), compute_s)

    def prefill_tokens_per_s(self, cfg: ModelConfig, context: int) -> float:
        return self.flops / flops_per_token(cfg, context // 2)
