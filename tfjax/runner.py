"""`Runner`: owns the device state (weights, paged KV) and the compiled step per bucket.

The engine hands it one step's work -- prefill chunks of any number of requests and all decode
rows -- and it runs them as ONE jitted call over a token-flattened ragged batch
(`models.llama.StepInput`, rows defined in `models.attention`): prefill chunks as tiles of
QUERY_TILE tokens, then one token per decode row, every row with its own page table, KV length
and query count. It returns the sampled token ids as a device array: prefill chunks first (in
the order given), then decode rows (in the order given).

Shapes are bucketed on (prefill tiles, decode rows) only: the page table always has the
longest row's width, since every attention backend reads only each row's own pages. Decode
rows are sorted by length inside the call so that the CPU backend's row groups are even.
`warmup` runs every bucket once on padding, so serving never compiles
(`tfjax.metrics.COMPILES` counts any compile that slips through, and tests assert it stays
flat). The KV cache is donated to every call and replaced by the call's output.

Under `jax.distributed` (`tfjax.distributed`) every process holds a `Runner` over the same
mesh and must make the same jitted calls: process 0's `step` hands its host inputs to
`lockstep` (set once warm-up is done, which every process runs alike) before running them,
and the other processes run what they receive through `run_inputs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.attention import QUERY_TILE, AttentionBatch, Backend, backend_for
from models.config import ModelConfig
from models.llama import KVCache, StepInput, forward, init_kv_cache, logits
from models.sharding import gathered_pages_sharding, kv_sharding, make_mesh
from models.weights import Weights
from tfjax.config import (
    DEFAULT_CPU_KV_PAGES,
    Bucket,
    EngineConfig,
    ceil_bucket,
    geometric_buckets,
)
from tfjax.kv.manager import PrefillWork
from tfjax.kv.pages import PAD_PAGE, pages_needed
from tfjax.kv.transfer import gather_pages, scatter_pages
from tfjax.logits import PenaltyInput
from tfjax.request import Request
from tfjax.sampling import SamplingInput, TokenLogprobs, sample, token_logprobs

UINT32_MASK = 0xFFFFFFFF

# One step's host arrays: model inputs, sampling rows, penalties (None: no row has any), and
# the flat index [N] of each output row's last token.
HostInputs = tuple[StepInput, SamplingInput, PenaltyInput | None, np.ndarray]


class StepBroadcast(Protocol):
    """Where process 0 sends each step's inputs before running them, and says when the step
    has completed (`tfjax.distributed`: a step that never completes is a lost worker)."""

    def send(self, bucket: Bucket, inputs: HostInputs, *, scored: bool) -> None: ...

    def completed(self) -> None: ...


@partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("kv",))
def _forward_logits(
    weights: Weights,
    kv: KVCache,
    step: StepInput,
    last_index_N: jax.Array,
    *,
    cfg: ModelConfig,
    backend: Backend,
) -> tuple[jax.Array, KVCache]:
    """Logits [N, V] at the flat tokens `last_index`. Module-level so runners of one model
    share compilations; sampling is a separate jit because it depends on the row count only,
    which halves the compile time of the bucket table."""
    hidden_TxD, kv = forward(weights, cfg, step, kv, backend)
    return logits(weights, cfg, hidden_TxD[last_index_N]), kv


_sample = jax.jit(sample)


@jax.jit
def _sample_scored(
    logits_NxV: jax.Array, sampling: SamplingInput, penalties: PenaltyInput | None
) -> tuple[jax.Array, TokenLogprobs]:
    """`sample` plus the raw logprobs of what it chose: the variant for steps with a row
    that asked for logprobs."""
    tokens_N = sample(logits_NxV, sampling, penalties)
    return tokens_N, token_logprobs(logits_NxV, tokens_N)


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
        self.backend = backend_for(config.attention_backend, mesh=self.mesh)
        self.page_size = config.page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_pages_per_row = pages_needed(max_model_len, config.page_size)
        self.kv_bytes_per_token = kv_bytes_per_token(cfg)
        self.page_bytes = self.kv_bytes_per_token * config.page_size
        self.max_gather_pages = self.max_pages_per_row
        self._gather_buckets = geometric_buckets(1, self.max_gather_pages)
        layout = self.backend.layout
        self.kv = init_kv_cache(
            cfg, num_pages, config.page_size, kv_sharding(self.mesh, layout), self.backend
        )
        # Step inputs are replicated over the mesh; gathered pages keep the KV's head split.
        self._input_sharding = NamedSharding(self.mesh, PartitionSpec())
        self.pages_sharding = gathered_pages_sharding(self.mesh, layout)
        self.config = config
        self.decode_step_s: dict[int, float] = {}  # measured by warmup, per batch bucket
        self.num_mask_words = -(-cfg.vocab_size // 32)  # the sampler's packed grammar mask
        # Device-resident all-ones masks per row count: steps without a grammar send none.
        self._all_allowed: dict[int, jax.Array] = {}
        self.mask_s = 0.0  # host seconds spent filling grammar masks (structured outputs)
        self.num_masked_steps = 0
        self.prefill_token_s = 1e-3
        self.lockstep: StepBroadcast | None = None  # set on process 0 of a multi-host run

    def warmup(self, on_compiled: Callable[[int, int], None] | None = None) -> None:
        """Compile every bucket by running it once on padding (only PAD_PAGE is written);
        `on_compiled(done, total)` reports progress."""
        buckets = self.config.step_buckets()
        total = len(buckets) + len(self._gather_buckets)
        for i, bucket in enumerate(buckets):
            jax.block_until_ready(self._warm(bucket))
            if on_compiled:
                on_compiled(i + 1, total)
        self._time_steps()
        for i, n in enumerate(self._gather_buckets):  # the host tier's page copies
            self.scatter([], self.gather([PAD_PAGE] * n))
            if on_compiled:
                on_compiled(len(buckets) + i + 1, total)
        jax.block_until_ready(self.kv)

    def _warm(self, bucket: Bucket) -> list[object]:
        """Run `bucket` on padding and sample with every sampler variant (with and without
        penalties, scored or not), so each is compiled for the very inputs serving gives it."""
        step, sampling, _, last = self.host_inputs(bucket, [], [])
        logits_NxV = self._forward(step, last)
        pad = PenaltyInput.neutral(len(last), self.max_model_len)
        sampling, penalties = jax.device_put((sampling, pad), self._input_sharding)
        return [
            variant(logits_NxV, sampling, p)
            for variant in (_sample, _sample_scored)
            for p in (None, penalties)
        ]

    def _time_steps(self) -> None:
        """First cost estimates for the policies, before any request ran: decode step time
        per batch bucket and prefill seconds per token (largest prefill bucket).
        The engine refines both with every real step (EWMA)."""

        def seconds(bucket: Bucket) -> float:
            start = time.perf_counter()
            jax.block_until_ready(self.run_inputs(self.host_inputs(bucket, [], [])))
            return time.perf_counter() - start

        self.decode_step_s = {b: seconds(Bucket(0, b)) for b in self.config.decode_batch_buckets()}
        largest = Bucket(self.config.prefill_tile_buckets()[-1], 0)
        self.prefill_token_s = seconds(largest) / largest.num_tokens

    def gather(self, page_ids: Sequence[int]) -> jax.Array:
        """Fresh [L, A, N, ...] copy of `page_ids` (A arrays per layer, the page axis moved
        to N, which is padded to a bucket)."""
        padded = self._padded_pages(page_ids, len(page_ids))
        return gather_pages(self.kv, padded, page_axis=self.backend.layout.page_axis)

    def scatter(self, page_ids: Sequence[int], pages: jax.Array) -> None:
        """Write `pages[:, :, i]` into device page `page_ids[i]`; other entries hit PAD_PAGE."""
        padded = self._padded_pages(page_ids, pages.shape[2])
        self.kv = scatter_pages(self.kv, padded, pages, page_axis=self.backend.layout.page_axis)

    def _padded_pages(self, page_ids: Sequence[int], n: int) -> np.ndarray:
        out = np.full(ceil_bucket(self._gather_buckets, max(n, 1)), PAD_PAGE, np.int32)
        out[: len(page_ids)] = page_ids
        return out

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> jax.Array:
        """Write the KV of each prefill chunk's next `num_tokens` prompt tokens and of each
        decode row's last token, in one call; return the token sampled after each: ids
        [>= len(prefill) + len(decode)], prefill chunks first (slice on the host: slicing on
        device would compile). Pages must already cover the tokens; `num_computed_tokens`
        is not advanced here."""
        return self._step(prefill, decode, scored=False)

    def step_scored(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> tuple[jax.Array, TokenLogprobs]:
        """`step`, plus every row's raw logprobs (`tfjax.sampling.token_logprobs`), in the
        same order; for steps where some request asked for logprobs."""
        return self._step(prefill, decode, scored=True)

    def _step(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request], *, scored: bool
    ) -> jax.Array | tuple[jax.Array, TokenLogprobs]:
        bucket = self.config.bucket_for([w.num_tokens for w in prefill], len(decode))
        step, last, rows = self._pack(bucket, prefill, decode)
        if self.lockstep is None:
            # The forward pass is dispatched first: grammar masks fill on the host meanwhile.
            logits_NxV = self._forward(step, last)
            return self._draw(logits_NxV, self._sampling(rows, len(last)), scored=scored)
        inputs = (step, *self._sampling(rows, len(last)), last)
        self.lockstep.send(bucket, inputs, scored=scored)
        # The engine reads the tokens at once anyway; waiting here tells the watchdog.
        result = jax.block_until_ready(self.run_inputs(inputs, scored=scored))
        self.lockstep.completed()
        return result

    def run_inputs(
        self, inputs: HostInputs, *, scored: bool = False
    ) -> jax.Array | tuple[jax.Array, TokenLogprobs]:
        """Run one step packed by `host_inputs`: sampled ids, plus logprobs if `scored`.
        Other processes of a multi-host run call this with what process 0 broadcast."""
        step, sampling, penalties, last = inputs
        return self._draw(self._forward(step, last), (sampling, penalties), scored=scored)

    def _forward(self, step: StepInput, last_N: np.ndarray) -> jax.Array:
        """Dispatch the step's forward pass (KV written); its logits [N, V] on the device."""
        step, last_N = jax.device_put((step, last_N), self._input_sharding)
        logits_NxV, self.kv = _forward_logits(
            self.weights, self.kv, step, last_N, cfg=self.cfg, backend=self.backend
        )
        return logits_NxV

    def _sampling(
        self, rows: _SamplingRows, num_rows: int
    ) -> tuple[SamplingInput, PenaltyInput | None]:
        """The rows' sampling inputs, their grammar masks filled (timed for /metrics)."""
        start = time.perf_counter()
        if rows.fill_masks():
            self.mask_s += time.perf_counter() - start
            self.num_masked_steps += 1
        return rows.arrays(self._all_allowed_mask(num_rows)), rows.penalties()

    def _draw(
        self,
        logits_NxV: jax.Array,
        sampling: tuple[SamplingInput, PenaltyInput | None],
        *,
        scored: bool,
    ) -> jax.Array | tuple[jax.Array, TokenLogprobs]:
        sampling_in, penalties = jax.device_put(sampling, self._input_sharding)
        return (_sample_scored if scored else _sample)(logits_NxV, sampling_in, penalties)

    def input_structure(self, bucket: Bucket, *, with_penalties: bool) -> jax.tree_util.PyTreeDef:
        """The pytree structure of `bucket`'s `HostInputs`, with or without penalty arrays:
        how another process rebuilds inputs it received as a flat list of arrays."""
        step, sampling, _, last = self.host_inputs(bucket, [], [])
        penalties = PenaltyInput.neutral(len(last), self.max_model_len) if with_penalties else None
        return jax.tree.structure((step, sampling, penalties, last))

    def host_inputs(
        self, bucket: Bucket, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> HostInputs:
        """One step's inputs, packed and grammar masks filled (what a multi-host step
        broadcasts)."""
        step, last, rows = self._pack(bucket, prefill, decode)
        return (step, *self._sampling(rows, len(last)), last)

    def _pack(
        self, bucket: Bucket, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> tuple[StepInput, np.ndarray, _SamplingRows]:
        """Pack one step into the bucket's host arrays (numpy): the model's inputs, the flat
        index of each output row's last token, and the sampling rows (masks not yet filled)."""
        s, split = self.page_size, bucket.tiles * QUERY_TILE
        num_rows = num_out = bucket.tiles + bucket.rows
        tokens_T = np.zeros(bucket.num_tokens, np.int32)
        positions_T = np.zeros(bucket.num_tokens, np.int32)
        slots_T = np.zeros(bucket.num_tokens, np.int32)  # pad tokens write into PAD_PAGE
        table_RxW = np.full((num_rows, self.max_pages_per_row), PAD_PAGE, np.int32)
        kv_lens_R = np.ones(num_rows, np.int32)  # pad rows see one (pad) key: no empty softmax
        q_lens_R = np.zeros(num_rows, np.int32)
        last_N = np.zeros(num_out, np.int32)
        sampling = _SamplingRows(num_out, self.max_model_len, self.num_mask_words)

        def put(row: int, first: int, request: Request, start: int, n: int) -> None:
            """Row `row` holds tokens start..start+n of `request` at flat index `first`.."""
            pos = np.arange(start, start + n, dtype=np.int32)
            pages = np.asarray(request.page_ids, np.int32)
            tokens_T[first : first + n] = request.token_ids[start : start + n]
            positions_T[first : first + n] = pos
            slots_T[first : first + n] = pages[pos // s] * s + pos % s
            table_RxW[row, : len(pages)] = pages
            kv_lens_R[row] = start + n
            q_lens_R[row] = n

        tile = 0
        for out, work in enumerate(prefill):
            request, start = work.request, work.request.num_computed_tokens
            for offset in range(0, work.num_tokens, QUERY_TILE):
                n = min(QUERY_TILE, work.num_tokens - offset)
                put(tile, tile * QUERY_TILE, request, start + offset, n)
                tile += 1
            last_N[out] = (tile - 1) * QUERY_TILE + n - 1
            sampling.set(out, request)
        by_length = sorted(range(len(decode)), key=lambda i: -decode[i].num_tokens)
        for row, i in enumerate(by_length):
            request = decode[i]
            put(bucket.tiles + row, split + row, request, request.num_tokens - 1, 1)
            last_N[len(prefill) + i] = split + row
            sampling.set(len(prefill) + i, request)
        step = StepInput(
            tokens=tokens_T,
            positions=positions_T,
            slot_ids=slots_T,
            attention=AttentionBatch(
                page_table=table_RxW, kv_lens=kv_lens_R, q_lens=q_lens_R, num_tiles=bucket.tiles
            ),
        )
        return step, last_N, sampling

    def _all_allowed_mask(self, num_rows: int) -> jax.Array:
        """The all-ones grammar mask of `num_rows` rows, on the device once (the step's
        `device_put` leaves an array already in place)."""
        if num_rows not in self._all_allowed:
            ones = np.full((num_rows, self.num_mask_words), -1, np.int32)
            self._all_allowed[num_rows] = jax.device_put(ones, self._input_sharding)
        return self._all_allowed[num_rows]


class _SamplingRows:
    """Host arrays of per-row sampling parameters; pad rows are greedy. The penalty arrays
    (`tfjax.logits.PenaltyInput`, histories `history_len` wide) and the grammar mask
    (`num_mask_words` wide) are only allocated once a row needs them, so batches without bias,
    penalties or grammars build and send none."""

    def __init__(self, n: int, history_len: int, num_mask_words: int) -> None:
        self.temperature = np.zeros(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.top_p = np.ones(n, np.float32)
        self.min_p = np.zeros(n, np.float32)
        self.seed = np.zeros(n, np.uint32)
        self.index = np.zeros(n, np.int32)
        self.history_len = history_len
        self._penalties: PenaltyInput | None = None
        self.num_mask_words = num_mask_words
        self.constrained = np.zeros(n, np.bool_)
        self._allowed: np.ndarray | None = None  # [n, num_mask_words] int32 once a row needs it
        self._constrained_rows: list[tuple[int, Request]] = []

    def fill_masks(self) -> bool:
        """Fill the grammar mask of every constrained row; False if there is none. Called
        after `set` for every row, once the step's forward pass is on its way."""
        if not self._constrained_rows:
            return False
        self._allowed = np.full((len(self.constrained), self.num_mask_words), -1, np.int32)
        for row, request in self._constrained_rows:
            request.grammar.fill_bitmask(self._allowed[row])
            self.constrained[row] = True
        return True

    def set(self, row: int, request: Request) -> None:
        params = request.sampling
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.seed[row] = (params.seed or 0) & UINT32_MASK
        self.index[row] = request.num_output_tokens
        if params.has_penalties:
            self._set_penalties(row, request)
        if request.grammar is not None:
            self._constrained_rows.append((row, request))

    def _set_penalties(self, row: int, request: Request) -> None:
        p = self.penalty_arrays()
        params = request.sampling
        tokens = request.token_ids
        p.history[row, : len(tokens)] = tokens
        p.num_prompt_tokens[row] = request.num_prompt_tokens
        p.num_tokens[row] = len(tokens)
        p.presence[row] = params.presence_penalty
        p.frequency[row] = params.frequency_penalty
        p.repetition[row] = params.repetition_penalty
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias, strict=True)
            p.bias_ids[row, : len(ids)] = ids
            p.bias[row, : len(ids)] = biases

    def penalties(self) -> PenaltyInput | None:
        """None if no row needs bias or penalties."""
        return self._penalties

    def penalty_arrays(self) -> PenaltyInput:
        """The penalty arrays, allocated on first use with every row off."""
        if self._penalties is None:
            self._penalties = PenaltyInput.neutral(len(self.temperature), self.history_len)
        return self._penalties

    def arrays(self, all_allowed: jax.Array) -> SamplingInput:
        """The rows' inputs; `all_allowed` is the mask sent when no row has a grammar."""
        return SamplingInput(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            output_index=self.index,
            allowed=all_allowed if self._allowed is None else self._allowed,
            constrained=self.constrained,
        )
