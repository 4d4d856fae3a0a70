"""`Runner`: owns the device state (weights, paged KV) and the compiled step per bucket.

The engine hands it requests; it turns them into one padded `StepInput` (host numpy, crossing
to the device once per call), runs the compiled forward + sampling, and returns the sampled
token ids as a device array (the caller fetches them after dispatching all of a step's work,
so prefill and decode calls queue back to back on the device).

Shapes are bucketed: decode batches by (rows, page-table width), prefill chunks by (length,
page-table width), so a short prompt never attends over the longest context's page table.
`warmup` runs every bucket once on padding, so serving never compiles
(`tfjax.metrics.COMPILES` counts any compile that slips through, and tests assert it stays
flat). The KV cache is donated to every call and replaced by the call's output.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.llama import KVCache, StepInput, forward, init_kv_cache, logits
from models.sharding import gathered_pages_sharding, kv_sharding, make_mesh
from models.weights import Weights
from tfjax.config import DEFAULT_CPU_KV_PAGES, EngineConfig, geometric_buckets
from tfjax.kv.pages import PAD_PAGE
from tfjax.kv.transfer import gather_pages, scatter_pages
from tfjax.request import Request
from tfjax.sampling import SamplingInput, sample

UINT32_MASK = 0xFFFFFFFF


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv",))
def _forward_logits(
    weights: Weights,
    kv: KVCache,
    step: StepInput,
    last_index_B: jax.Array,
    *,
    cfg: ModelConfig,
) -> tuple[jax.Array, KVCache]:
    """Logits [B, V] at each row's `last_index`. Module-level so runners of one model share
    compilations; sampling is a separate jit because it depends on the batch size only, which
    halves the compile time of the (batch x tokens x width) bucket table."""
    hidden_BxTxD, kv = forward(weights, cfg, step, kv)
    last_BxD = jnp.take_along_axis(hidden_BxTxD, last_index_B[:, None, None], axis=1)[:, 0]
    return logits(weights, cfg, last_BxD), kv


_sample = jax.jit(sample)


@dataclass(frozen=True, slots=True)
class Bucket:
    batch: int
    tokens: int
    width: int  # pages per row in the page table


def enable_compilation_cache(cache_dir: Path) -> None:
    """Persist compiled buckets under `cache_dir`: the first start compiles (minutes for a
    30-layer model on a 2-core CPU), later starts load the executables from disk."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def default_num_pages(cfg: ModelConfig, config: EngineConfig) -> int:
    """Device KV pages: a fraction of free device memory, or a fixed pool on CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_PAGES
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    page_bytes = kv_bytes_per_token(cfg) * config.page_size
    return max(2, int(free * config.device_memory_fraction) // page_bytes)


class Runner:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: Weights,
        config: EngineConfig,
        *,
        num_pages: int,
        max_model_len: int,
        mesh: Mesh | None = None,
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh or make_mesh(1, cfg)
        self.weights = weights
        self.page_size = config.page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_pages_per_row = -(-max_model_len // config.page_size)
        self.kv_bytes_per_token = kv_bytes_per_token(cfg)
        self.page_bytes = self.kv_bytes_per_token * config.page_size
        self.max_gather_pages = self.max_pages_per_row
        self._gather_buckets = geometric_buckets(1, self.max_gather_pages)
        self.kv = init_kv_cache(cfg, num_pages, config.page_size, kv_sharding(self.mesh))
        # Step inputs are replicated over the mesh; gathered pages keep the KV's head split.
        self._input_sharding = NamedSharding(self.mesh, PartitionSpec())
        self.pages_sharding = gathered_pages_sharding(self.mesh)
        self._batch_buckets = config.decode_batch_buckets()
        self._chunk_buckets = config.prefill_chunk_buckets()
        self._width_buckets = config.page_width_buckets(max_model_len)
        self.decode_step_s: dict[int, float] = {}  # measured by warmup, per batch bucket
        self.prefill_token_s = 1e-3

    def buckets(self) -> list[Bucket]:
        decode = [Bucket(b, 1, w) for b in self._batch_buckets for w in self._width_buckets]
        prefill = [
            Bucket(1, t, w)
            for t in self._chunk_buckets
            for w in self._width_buckets
            if t <= w * self.page_size  # a chunk never spans more pages than its row has
        ]
        return prefill + decode

    def warmup(self, on_compiled: Callable[[int, int], None] | None = None) -> None:
        """Compile every bucket by running it once on padding (only PAD_PAGE is written);
        `on_compiled(done, total)` reports progress."""
        buckets = self.buckets()
        total = len(buckets) + len(self._gather_buckets)
        for i, bucket in enumerate(buckets):
            jax.block_until_ready(self._run(bucket, [], [], [], []))
            if on_compiled:
                on_compiled(i + 1, total)
        self._time_steps()
        for i, n in enumerate(self._gather_buckets):  # the host tier's page copies
            self.scatter([], self.gather([PAD_PAGE] * n))
            if on_compiled:
                on_compiled(len(buckets) + i + 1, total)
        jax.block_until_ready(self.kv)

    def _time_steps(self) -> None:
        """First cost estimates for the policies, before any request ran: decode step time
        per batch bucket (narrowest page table) and prefill seconds per token (largest chunk).
        The engine refines both with every real step (EWMA)."""

        def seconds(bucket: Bucket) -> float:
            start = time.perf_counter()
            jax.block_until_ready(self._run(bucket, [], [], [], []))
            return time.perf_counter() - start

        width = self._width_buckets[0]
        self.decode_step_s = {b: seconds(Bucket(b, 1, width)) for b in self._batch_buckets}
        chunk = self._chunk_buckets[-1]
        widest = _ceil_bucket(self._width_buckets, -(-chunk // self.page_size))
        self.prefill_token_s = seconds(Bucket(1, chunk, widest)) / chunk

    def gather(self, page_ids: Sequence[int]) -> jax.Array:
        """Fresh [L, 2, N, S, K, Dh] copy of `page_ids`, N padded to a bucket."""
        return gather_pages(self.kv, self._padded_pages(page_ids, len(page_ids)))

    def scatter(self, page_ids: Sequence[int], pages: jax.Array) -> None:
        """Write `pages[:, :, i]` into device page `page_ids[i]`; other entries hit PAD_PAGE."""
        self.kv = scatter_pages(self.kv, self._padded_pages(page_ids, pages.shape[2]), pages)

    def _padded_pages(self, page_ids: Sequence[int], n: int) -> np.ndarray:
        out = np.full(_ceil_bucket(self._gather_buckets, max(n, 1)), PAD_PAGE, np.int32)
        out[: len(page_ids)] = page_ids
        return out

    def prefill(self, request: Request, num_tokens: int) -> jax.Array:
        """Write KV of the next `num_tokens` prompt tokens; return the token sampled after them.

        The request's pages must already cover them; `num_computed_tokens` is not advanced here.
        """
        start = request.num_computed_tokens
        tokens = _ceil_bucket(self._chunk_buckets, num_tokens)
        pages = max(len(request.page_ids), -(-tokens // self.page_size))
        bucket = Bucket(1, tokens, _ceil_bucket(self._width_buckets, pages))
        positions = list(range(start, start + num_tokens))
        return self._run(
            bucket,
            [request],
            [request.token_ids[start : start + num_tokens]],
            [positions],
            [num_tokens - 1],
        )

    def decode(self, requests: Sequence[Request]) -> jax.Array:
        """One token for each request (its last token's KV is written): ids [bucket >= len],
        row i for requests[i] (slice on the host: slicing on device would compile)."""
        width = max(len(r.page_ids) for r in requests)
        bucket = Bucket(
            _ceil_bucket(self._batch_buckets, len(requests)),
            1,
            _ceil_bucket(self._width_buckets, width),
        )
        return self._run(
            bucket,
            list(requests),
            [[r.token_ids[-1]] for r in requests],
            [[r.num_tokens - 1] for r in requests],
            [0] * len(requests),
        )

    def _run(
        self,
        bucket: Bucket,
        requests: list[Request],
        tokens: list[list[int]],
        positions: list[list[int]],
        last_index: list[int],
    ) -> jax.Array:
        step, sampling, last_B = self._inputs(bucket, requests, tokens, positions, last_index)
        logits_BxV, self.kv = _forward_logits(self.weights, self.kv, step, last_B, cfg=self.cfg)
        return _sample(logits_BxV, sampling)

    def _inputs(
        self,
        bucket: Bucket,
        requests: list[Request],
        tokens: list[list[int]],
        positions: list[list[int]],
        last_index: list[int],
    ) -> tuple[StepInput, SamplingInput, jax.Array]:
        """Pad one call's rows into the bucket's host arrays and move them to the device."""
        b, t, w, s = bucket.batch, bucket.tokens, bucket.width, self.page_size
        tokens_BxT = np.zeros((b, t), np.int32)
        positions_BxT = np.zeros((b, t), np.int32)
        slots_BxT = np.zeros((b, t), np.int32)  # pad tokens write into PAD_PAGE
        page_table_BxW = np.full((b, w), PAD_PAGE, np.int32)
        kv_lens_B = np.ones((b,), np.int32)  # pad rows see one (pad) key: no empty softmax
        last_B = np.zeros((b,), np.int32)
        temperature_B = np.zeros((b,), np.float32)
        top_k_B = np.zeros((b,), np.int32)
        top_p_B = np.ones((b,), np.float32)
        seed_B = np.zeros((b,), np.uint32)
        index_B = np.zeros((b,), np.int32)
        for row, request in enumerate(requests):
            pos = np.asarray(positions[row], np.int32)
            pages = np.asarray(request.page_ids, np.int32)
            n = len(pos)
            tokens_BxT[row, :n] = tokens[row]
            positions_BxT[row, :n] = pos
            slots_BxT[row, :n] = pages[pos // s] * s + pos % s
            page_table_BxW[row, : len(pages)] = pages
            kv_lens_B[row] = pos[-1] + 1
            last_B[row] = last_index[row]
            params = request.sampling
            temperature_B[row] = params.temperature
            top_k_B[row] = params.top_k
            top_p_B[row] = params.top_p
            seed_B[row] = (params.seed or 0) & UINT32_MASK
            index_B[row] = request.num_output_tokens
        step = StepInput(
            tokens=tokens_BxT,
            positions=positions_BxT,
            slot_ids=slots_BxT,
            page_table=page_table_BxW,
            kv_lens=kv_lens_B,
        )
        sampling = SamplingInput(
            temperature=temperature_B,
            top_k=top_k_B,
            top_p=top_p_B,
            seed=seed_B,
            output_index=index_B,
        )
        return jax.device_put((step, sampling, last_B), self._input_sharding)


def _ceil_bucket(buckets: Sequence[int], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
