"""`Runner`: owns the device state (weights, paged KV) and runs each step as compiled calls.

The engine hands it one step's work -- prefill chunks of any number of requests and all decode
rows -- and it runs them as ONE jitted call over a token-flattened ragged batch
(`models.llama.StepInput`, rows defined in `models.attention`): prefill chunks as tiles of
QUERY_TILE tokens, then one token per decode row, every row with its own page table, KV length
and query count. It returns the sampled token ids as a device array: prefill chunks first (in
the order given), then decode rows (in the order given).

Shapes are bucketed on (prefill tiles, decode rows) only: the page table always has the
longest row's width, since every attention backend reads only each row's own pages. Decode
rows are sorted by length inside the call so that the CPU backend's row groups are even.
The KV cache is donated to every call and replaced by the call's output.

Steps only ever call executables of the runner's table (`tfjax.executables.Executables`,
`runner.executables`), which `warmup` fills ahead of time, or partly, with the rest compiled
in the background; until a step's own bucket is in the table, the step runs in compiled ones,
padded or split into several calls (`num_fallback_steps` counts them).

Under `jax.distributed` (`tfjax.distributed`) every process holds a `Runner` over the same
mesh and must make the same jitted calls: process 0 hands each call's host inputs to
`lockstep` (set once warm-up is done, which every process runs alike) before running them,
and the other processes run what they receive through `run_inputs`.

Grammar masks (structured outputs) are filled on the host after a call's forward pass is
dispatched, so the two overlap; a multi-host call fills them first, since they are part of
what it broadcasts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.attention import QUERY_TILE, AttentionBatch, backend_for
from models.config import ModelConfig
from models.llama import StepInput, init_kv_cache
from models.sharding import gathered_pages_sharding, kv_sharding, make_mesh
from models.weights import Weights
from tfjax.compile_plan import Call, Chunk, calls_for, merge_rows, split_step
from tfjax.config import DEFAULT_CPU_KV_PAGES, Bucket, EngineConfig
from tfjax.distributed import barrier
from tfjax.executables import Executables
from tfjax.kv.manager import PrefillWork
from tfjax.kv.pages import PAD_PAGE, pages_needed
from tfjax.logits import PenaltyInput
from tfjax.request import Request
from tfjax.sampling import SamplingInput, TokenLogprobs
from tfjax.timing import median_seconds

UINT32_MASK = 0xFFFFFFFF

# One call's host arrays: model inputs, sampling rows, penalties (None: no row has any), and
# the flat index [N] of each output row's last token.
HostInputs = tuple[StepInput, SamplingInput, PenaltyInput | None, np.ndarray]


class StepBroadcast(Protocol):
    """Where process 0 sends each call's inputs before running them, and says when the call
    has completed (`tfjax.distributed`: a call that never completes is a lost worker)."""

    def send(self, bucket: Bucket, inputs: HostInputs, *, scored: bool) -> None: ...

    def completed(self) -> None: ...


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
    """The engine's one way to the device: runs each step's prefill chunks and decode rows as
    calls of the compiled table (`executables`) over the KV it owns, and copies pages in and
    out of that KV for the host tier (module docstring)."""

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
        layout = self.backend.layout
        self.kv = init_kv_cache(
            cfg, num_pages, config.page_size, kv_sharding(self.mesh, layout), self.backend
        )
        # Step inputs are replicated over the mesh; gathered pages keep the KV's head split.
        self._input_sharding = NamedSharding(self.mesh, PartitionSpec())
        self._multi_process = jax.process_count() > 1  # a `jax.distributed` run
        self.pages_sharding = gathered_pages_sharding(self.mesh, layout)
        self.config = config
        self.decode_step_s: dict[int, float] = {}  # measured by warmup, per batch bucket
        self.prefill_token_s = 1e-3
        self.lockstep: StepBroadcast | None = None  # set on process 0 of a multi-host run
        self.num_mask_words = -(-cfg.vocab_size // 32)  # the sampler's packed grammar mask
        # Device-resident all-ones masks per row count: steps without a grammar send none.
        self._all_allowed: dict[int, jax.Array] = {}
        self.mask_s = 0.0  # host seconds spent filling grammar masks (structured outputs)
        self.num_masked_steps = 0
        self.num_fallback_steps = 0  # steps run in other buckets than their own
        # The compiled calls: `warmup` fills the table; before it, each compiles when first
        # needed, as a plain jit would.
        self.executables = Executables(
            cfg,
            weights,
            self.backend,
            self.kv,
            step_buckets=config.step_buckets(),
            max_pages_per_row=self.max_pages_per_row,
            max_model_len=max_model_len,
            input_sharding=self._input_sharding,
            example_inputs=self._example_inputs,
        )

    def warmup(
        self,
        on_compiled: Callable[[int, int], None] | None = None,
        *,
        first: Sequence[Bucket] | None = None,
    ) -> None:
        """Compile the step buckets `first` and the start-up page copies (default: all of
        them; `Executables.compile_startup`, which reports `on_compiled(done, total)`), then
        time a few steps for the policies' first cost estimates. The other buckets compile
        with `runner.executables.compile_rest_in_background()`."""
        self.executables.compile_startup(on_compiled, first=first)
        if self._multi_process:
            barrier("tfjax: start-up buckets compiled")
        self._time_steps()

    def _time_steps(self) -> None:
        """First cost estimates for the policies, before any request ran: decode step time
        per batch bucket and prefill seconds per token (largest prefill bucket).
        The engine refines both with every real step (EWMA)."""

        def seconds(bucket: Bucket, runs: int) -> float:
            """Typical, not first-call, time (`median_seconds`): a first call's 8x made
            TokenFlow's capacity so low that it fell back to FCFS early in a burst."""
            return median_seconds(
                lambda: jax.block_until_ready(self._sampled(Call.padding(bucket), scored=False)),
                runs,
            )

        compiled = self.executables.compiled
        self.decode_step_s = {
            b.rows: seconds(b, runs=3)
            for b in sorted(compiled, key=lambda b: b.rows)
            if not b.tiles
        }
        largest = max(compiled, key=lambda b: (b.tiles, -b.rows))
        self.prefill_token_s = seconds(largest, runs=1) / largest.num_tokens

    @property
    def max_gather_pages(self) -> int:
        """`PageIO.max_gather_pages`: `Executables.max_gather_pages`."""
        return self.executables.max_gather_pages

    def gather(self, page_ids: Sequence[int]) -> jax.Array:
        """Fresh [L, A, N, ...] copy of `page_ids` (A arrays per layer, the page axis moved
        to N, which is padded to the smallest compiled size that holds it)."""
        padded = self._padded_pages(page_ids, len(page_ids))
        gather, _ = self.executables.page_copies[len(padded)]
        return gather(self.kv, padded)

    def scatter(self, page_ids: Sequence[int], pages: jax.Array) -> None:
        """Write `pages[:, :, i]` into device page `page_ids[i]`; other entries hit PAD_PAGE."""
        padded = self._padded_pages(page_ids, pages.shape[2])
        _, scatter = self.executables.page_copies[len(padded)]
        self.kv = scatter(self.kv, padded, pages)

    def _padded_pages(self, page_ids: Sequence[int], n: int) -> np.ndarray:
        """`page_ids` padded with PAD_PAGE to the compiled copy size that holds `n` pages."""
        out = np.full(self.executables.page_copy_size(n), PAD_PAGE, np.int32)
        out[: len(page_ids)] = page_ids
        return out

    def step(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> jax.Array | np.ndarray:
        """Write the KV of each prefill chunk's next `num_tokens` prompt tokens and of each
        decode row's last token; return the token sampled after each: ids [>= len(prefill) +
        len(decode)], prefill chunks first (slice on the host: slicing on device would
        compile). One call when the step's bucket is compiled. Pages must already cover the
        tokens; `num_computed_tokens` is not advanced here."""
        return self._run(self._calls(prefill, decode), len(prefill) + len(decode), scored=False)

    def step_scored(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> tuple[jax.Array | np.ndarray, TokenLogprobs]:
        """`step`, plus every row's raw logprobs (`tfjax.sampling.token_logprobs`), in the
        same order; for steps where some request asked for logprobs."""
        return self._run(self._calls(prefill, decode), len(prefill) + len(decode), scored=True)

    def _calls(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> list[Call]:
        """The step as calls of compiled buckets: its own bucket if compiled, else those
        `calls_for` picks (`split_step` fills them)."""
        bucket = self.config.bucket_for([w.num_tokens for w in prefill], len(decode))
        compiled = self.executables.compiled_for(bucket)
        if bucket in compiled:
            buckets: Sequence[Bucket] = (bucket,)
        else:
            tiles = sum(-(-w.num_tokens // QUERY_TILE) for w in prefill)
            buckets = calls_for(tiles, len(decode), compiled)
            self.executables.ran_padded(bucket, buckets)
            self.num_fallback_steps += 1
        return split_step(prefill, decode, buckets)

    def _run(self, calls: Sequence[Call], num_rows: int, *, scored: bool) -> Any:
        """Each call's sampled outputs; one call's as they are (on the device), several
        merged on the host into the step's row order."""
        outputs = [self._sampled(call, scored=scored) for call in calls]  # all dispatched
        if len(calls) == 1:
            return outputs[0]
        return jax.tree.map(
            lambda *parts: merge_rows(calls, parts, num_rows), *jax.device_get(outputs)
        )

    def _sampled(self, call: Call, *, scored: bool) -> Any:
        """Run one call: its tokens [N] (and logprobs if `scored`), on the device."""
        step, last, rows = self._pack(call.bucket, call.chunks, call.decode)
        if self.lockstep is None:
            # The forward pass is dispatched first: grammar masks fill on the host meanwhile.
            logits_NxV = self._forward(call.bucket, step, last)
            return self._draw(logits_NxV, self._sampling(rows), scored=scored)
        inputs = (step, *self._sampling(rows), last)
        self.lockstep.send(call.bucket, inputs, scored=scored)
        # The engine reads the tokens at once anyway; waiting here tells the watchdog.
        result = jax.block_until_ready(self.run_inputs(call.bucket, inputs, scored=scored))
        self.lockstep.completed()
        return result

    def run_inputs(self, bucket: Bucket, inputs: HostInputs, *, scored: bool = False) -> Any:
        """Run one call packed by `host_inputs`: sampled ids, plus logprobs if `scored`.
        Other processes of a multi-host run call this with what process 0 broadcast (a
        bucket they have not compiled yet compiles here first)."""
        if bucket not in self.executables.compiled:
            self.executables.compile_step(bucket)
        step, sampling, penalties, last = inputs
        logits_NxV = self._forward(bucket, step, last)
        return self._draw(logits_NxV, (sampling, penalties), scored=scored)

    def _forward(self, bucket: Bucket, step: StepInput, last_N: np.ndarray) -> jax.Array:
        """Dispatch `bucket`'s forward pass (KV written); its logits [N, V] on the device."""
        step, last_N = self._put((step, last_N))
        logits_NxV, self.kv = self.executables.forwards[bucket](self.weights, self.kv, step, last_N)
        return logits_NxV

    def _sampling(self, rows: _SamplingRows) -> tuple[SamplingInput, PenaltyInput | None]:
        """The rows' sampling inputs, their grammar masks filled (timed for /metrics);
        `allowed` is None when no row has a grammar (see `_draw`)."""
        start = time.perf_counter()
        if rows.fill_masks():
            self.mask_s += time.perf_counter() - start
            self.num_masked_steps += 1
        return rows.arrays(), rows.penalties()

    def _draw(
        self,
        logits_NxV: jax.Array,
        sampling: tuple[SamplingInput, PenaltyInput | None],
        *,
        scored: bool,
    ) -> Any:
        """Sample the call's rows with the compiled sampler of their row count."""
        sampling_in, penalties = sampling
        sampling_in, penalties = self._put((self._masked(sampling_in), penalties))
        key = (len(logits_NxV), scored, penalties is not None)
        return self.executables.samplers[key](logits_NxV, sampling_in, penalties)

    def _put(self, host_inputs: Any) -> Any:
        """Host arrays onto the mesh, replicated. Under several processes, through
        `make_array_from_process_local_data`: `device_put` would first run one collective per
        array to check that every process holds the same data, which they do by construction
        (process 0 broadcast them): 14 collectives a step, most of a 2-process step's overhead."""
        if not self._multi_process:
            return jax.device_put(host_inputs, self._input_sharding)
        return jax.tree.map(
            lambda a: (
                a
                if isinstance(a, jax.Array)
                else jax.make_array_from_process_local_data(self._input_sharding, a)
            ),
            host_inputs,
        )

    def _masked(self, sampling: SamplingInput) -> SamplingInput:
        """`sampling` with a grammar mask: a call without constrained rows gets the all-ones
        mask of its row count, put on the device once (its `device_put` is then a no-op).

        Every process of a multi-host run takes this path alike, from host inputs that carry
        no mask: a `device_put` of host data there is a collective (JAX checks the data are
        equal on every process), so process 0 and the workers must put the same arrays."""
        if sampling.allowed is not None:
            return sampling
        num_rows = len(sampling.temperature)
        if num_rows not in self._all_allowed:
            self._all_allowed[num_rows] = self._put(all_allowed(num_rows, self.num_mask_words))
        return dataclasses.replace(sampling, allowed=self._all_allowed[num_rows])

    def _example_inputs(self, bucket: Bucket) -> HostInputs:
        """`bucket`'s call without rows, with a grammar mask: what its executables are lowered
        on (shapes only)."""
        step, sampling, penalties, last = self.host_inputs(bucket, [], [])
        allowed = all_allowed(len(last), self.num_mask_words)
        return step, dataclasses.replace(sampling, allowed=allowed), penalties, last

    def input_structure(
        self, bucket: Bucket, *, with_penalties: bool, masked: bool
    ) -> jax.tree_util.PyTreeDef:
        """The pytree structure of `bucket`'s `HostInputs`, with or without penalty arrays
        and a grammar mask: how another process rebuilds inputs it received as a flat list of
        arrays."""
        inputs = self._example_inputs(bucket) if masked else self.host_inputs(bucket, [], [])
        step, sampling, _, last = inputs
        penalties = PenaltyInput.neutral(len(last), self.max_model_len) if with_penalties else None
        return jax.tree.structure((step, sampling, penalties, last))

    def host_inputs(
        self, bucket: Bucket, chunks: Sequence[Chunk], decode: Sequence[Request]
    ) -> HostInputs:
        """One call's inputs, packed and grammar masks filled (what a multi-host call
        broadcasts)."""
        step, last, rows = self._pack(bucket, chunks, decode)
        return (step, *self._sampling(rows), last)

    def _pack(
        self, bucket: Bucket, chunks: Sequence[Chunk], decode: Sequence[Request]
    ) -> tuple[StepInput, np.ndarray, _SamplingRows]:
        """Pack one call into the bucket's host arrays (numpy): the model's inputs, the flat
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
        for out, chunk in enumerate(chunks):
            request, start = chunk.request, chunk.start
            for offset in range(0, chunk.num_tokens, QUERY_TILE):
                n = min(QUERY_TILE, chunk.num_tokens - offset)
                put(tile, tile * QUERY_TILE, request, start + offset, n)
                tile += 1
            last_N[out] = (tile - 1) * QUERY_TILE + n - 1
            sampling.set(out, request)
        by_length = sorted(range(len(decode)), key=lambda i: -decode[i].num_tokens)
        for row, i in enumerate(by_length):
            request = decode[i]
            put(bucket.tiles + row, split + row, request, request.num_tokens - 1, 1)
            last_N[len(chunks) + i] = split + row
            sampling.set(len(chunks) + i, request)
        step = StepInput(
            tokens=tokens_T,
            positions=positions_T,
            slot_ids=slots_T,
            attention=AttentionBatch(
                page_table=table_RxW, kv_lens=kv_lens_R, q_lens=q_lens_R, num_tiles=bucket.tiles
            ),
        )
        return step, last_N, sampling


def all_allowed(num_rows: int, num_words: int) -> np.ndarray:
    """The grammar mask [num_rows, num_words] (`SamplingInput.allowed`) with every bit set:
    rows free to take any token."""
    return np.full((num_rows, num_words), -1, np.int32)


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
        self._allowed = all_allowed(len(self.constrained), self.num_mask_words)
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

    def arrays(self) -> SamplingInput:
        """The rows' inputs; without a constrained row, no mask (`Runner._masked` adds
        the all-ones one)."""
        return SamplingInput(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            output_index=self.index,
            allowed=self._allowed,
            constrained=self.constrained,
        )
