"""`Executables`: the runner's table of compiled calls, and the compiles that fill it.

`warmup` compiles buckets ahead of time (`jit(...).lower(...).compile()`, nothing runs) into a
table of executables, and steps only ever call those, so serving never compiles
(`tfjax.metrics.COMPILES` counts any compile that slips through, and tests assert it stays
flat). `warmup(first=...)` compiles only some buckets, so that a replica serves sooner, and
`compile_rest_in_background` the others on a thread (tfjax/compile_plan.py): a bucket whose
steps have padded enough to pay for its compile first, the others only while no step runs,
since a compile takes the cores, and the interpreter lock while it traces, from the steps.
Until a step's own bucket is in the table, the step runs in compiled ones, padded or split
into several calls (`Runner.num_fallback_steps` counts them). Page copies (the host tier's
gather and scatter) are compiled per size the same way and pad up to a compiled size
meanwhile.

A step bucket compiles as two executables: the forward pass to the logits of its output rows
(`_forward_logits`), and the sampler of its row count (`_sample`, or `_sample_scored` for
steps that return logprobs), which buckets of one row count share.

The table is read by the engine thread (every step) and filled by the compile thread, without
a lock: the compile thread publishes new dicts and sets, never mutating one the engine thread
may be reading, and publishes a bucket's forward pass and samplers before `compiled` names it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from models.attention import Backend
from models.config import ModelConfig
from models.llama import KVCache, StepInput, forward, logits
from models.weights import Weights
from tfjax.compile_plan import PaddingLedger, background_order, startup_page_copies
from tfjax.config import Bucket, ceil_bucket, geometric_buckets
from tfjax.kv.transfer import gather_pages, scatter_pages
from tfjax.logits import PenaltyInput
from tfjax.metrics import COMPILES
from tfjax.sampling import SamplingInput, TokenLogprobs, sample, token_logprobs

if TYPE_CHECKING:
    from tfjax.runner import HostInputs

log = logging.getLogger(__name__)

BACKGROUND_NICE = 10  # the compile thread yields the CPU to the engine thread's steps
# The compile thread compiles a bucket no step needs once the engine has run no step for this
# long: longer than the host work between two steps of a busy engine.
IDLE_S = 0.5


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


class Executables:
    """One runner's compiled step buckets and page copies, and the compiles that fill them.

    `forwards`, `samplers`, `page_copies` and `compiled` are read-only outside this class:
    the compile thread replaces them (module docstring), so a reader takes each once per use.
    Until `compile_startup`, a missing bucket or page-copy size compiles when first needed,
    as a plain jit would (calibration measures each shape it runs and compiles only those).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Weights,
        backend: Backend,
        kv: KVCache,
        *,
        step_buckets: Sequence[Bucket],
        max_pages_per_row: int,
        max_model_len: int,
        input_sharding: NamedSharding,
        example_inputs: Callable[[Bucket], HostInputs],
    ) -> None:
        """`kv`: the runner's cache, of which only shapes and shardings are kept;
        `example_inputs(bucket)`: a call of `bucket` packed as serving packs it, with no rows
        (what its executables are lowered on)."""
        self.cfg = cfg
        self.weights = weights
        self.backend = backend
        self.step_buckets = tuple(step_buckets)
        self.gather_buckets = geometric_buckets(1, max_pages_per_row)  # page-copy sizes
        self.max_model_len = max_model_len
        self._input_sharding = input_sharding
        self._example_inputs = example_inputs
        # What calls are lowered against: the KV's shapes and shardings (never the live arrays,
        # which the engine thread donates while the compile thread lowers).
        self._kv_spec = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), kv
        )
        self.forwards: dict[Bucket, jax.stages.Compiled] = {}
        # Samplers by (rows, scored, penalized): buckets of one row count share them.
        self.samplers: dict[tuple[int, bool, bool], jax.stages.Compiled] = {}
        # (gather, scatter) by number of pages.
        self.page_copies: dict[int, tuple[jax.stages.Compiled, jax.stages.Compiled]] = {}
        self.compiled: frozenset[Bucket] = frozenset()  # the step buckets in the table
        self._stop_compiling = threading.Event()
        self._compile_thread: threading.Thread | None = None
        # Buckets whose steps have padded enough to compile them next, in order: the engine
        # thread adds them, the compile thread waits on `_demand` for them.
        self._padding = PaddingLedger()
        self._wanted: list[Bucket] = []
        self._demand = threading.Condition()
        self.all_compiled = threading.Event()  # set once every bucket is in the table
        self._compile_on_demand = True

    def compile_startup(
        self,
        on_compiled: Callable[[int, int], None] | None = None,
        *,
        first: Sequence[Bucket] | None = None,
    ) -> None:
        """Compile the step buckets `first` and `startup_page_copies` (default: every step
        bucket and page-copy size), reporting `on_compiled(done, total)`, and compile nothing
        on demand from now on: steps that need a bucket not compiled yet run in compiled ones
        (`tfjax.compile_plan.calls_for`), and page copies pad up to a compiled size, until
        `compile_rest_in_background` adds them."""
        self._compile_on_demand = False
        buckets = self.step_buckets if first is None else list(first)
        sizes = self.gather_buckets if first is None else startup_page_copies(self.gather_buckets)
        total = len(buckets) + len(sizes)
        for i, bucket in enumerate(buckets):
            self.compile_step(bucket)
            if on_compiled:
                on_compiled(i + 1, total)
        for i, n in enumerate(sizes):  # the host tier's page copies
            self._compile_page_copy(n)
            if on_compiled:
                on_compiled(len(buckets) + i + 1, total)
        done, total = self.compile_progress()
        if done == total:
            self.all_compiled.set()

    def compile_rest_in_background(
        self, engine_idle_for: Callable[[], float] | None = None
    ) -> None:
        """Compile the step buckets and page-copy sizes `compile_startup` left out on a thread
        of their own, at a lower OS priority: a bucket as soon as its steps have padded enough
        (`ran_padded`), the others while the engine is idle (`engine_idle_for()`, seconds
        since it last ran a step, 0 while it runs one, reaches `IDLE_S`; None: no engine to
        wait for), step buckets smallest first, then page copies (the host tier copies a page
        at a time meanwhile). `all_compiled` is set when they are all in."""
        steps = background_order(self.step_buckets, self.compiled)
        sizes = [n for n in self.gather_buckets if n not in self.page_copies]
        if not steps and not sizes:
            return
        self._compile_thread = threading.Thread(
            target=self._compile_in_background,
            args=(steps, sizes, engine_idle_for or (lambda: IDLE_S)),
            name="tfjax-compile",
            daemon=True,
        )
        self._compile_thread.start()

    def compile_progress(self) -> tuple[int, int]:
        """(buckets compiled, buckets in all), step buckets and page-copy sizes together."""
        total = len(self.step_buckets) + len(self.gather_buckets)
        return len(self.compiled) + len(self.page_copies), total

    def stop_compiling(self, timeout_s: float = 30.0) -> None:
        """Compile no further bucket in the background, and wait up to `timeout_s` for the
        one being compiled, so that the process does not exit in the middle of a compile."""
        self._stop_compiling.set()
        with self._demand:
            self._demand.notify()
        if self._compile_thread is not None:
            self._compile_thread.join(timeout_s)

    def _compile_in_background(
        self, buckets: Sequence[Bucket], sizes: Sequence[int], idle_for: Callable[[], float]
    ) -> None:
        """The compile thread: what `_next_compile` says, until nothing is left, counted apart
        from serving-path compiles (`COMPILES.background`), at a lower OS priority than the
        engine thread."""
        if sys.platform == "linux":  # there, the priority of one thread (elsewhere: a process)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        start = time.perf_counter()
        try:
            with COMPILES.background():
                while (compile_next := self._next_compile(buckets, sizes, idle_for)) is not None:
                    compile_next()
        except Exception:  # serving goes on in the buckets compiled so far
            log.exception("compiling buckets in the background failed")
            return
        if self._stop_compiling.is_set():
            return
        log.info(
            "compiled the other %d buckets in the background in %.1f s",
            len(buckets) + len(sizes),
            time.perf_counter() - start,
        )
        self.all_compiled.set()

    def _next_compile(
        self, buckets: Sequence[Bucket], sizes: Sequence[int], idle_for: Callable[[], float]
    ) -> Callable[[], None] | None:
        """The next compile of the background thread, waiting for it if need be: the first
        bucket steps padded enough, else (once the engine is idle) the first of `buckets`, then
        of page-copy `sizes`, not compiled yet, a step bucket abandoned if a step starts
        meanwhile; None when all are in or compiling stops."""
        with self._demand:
            while not self._stop_compiling.is_set():
                wanted = [b for b in self._wanted if b not in self.compiled]
                if wanted:
                    return partial(self.compile_step, wanted[0])
                steps = [b for b in buckets if b not in self.compiled]
                copies = [n for n in sizes if n not in self.page_copies]
                if not steps and not copies:
                    return None
                idle_s = idle_for()
                if idle_s >= IDLE_S:
                    if steps:
                        return partial(self.compile_step, steps[0], lambda: idle_for() >= IDLE_S)
                    return partial(self._compile_page_copy, copies[0])
                self._demand.wait(IDLE_S - idle_s)
        return None

    def compiled_for(self, bucket: Bucket) -> frozenset[Bucket]:
        """The buckets a step of `bucket` may run in: those compiled, `bucket` among them if
        it is still compiled on demand (before `compile_startup`)."""
        if self._compile_on_demand and bucket not in self.compiled:
            self.compile_step(bucket)
        return self.compiled

    def ran_padded(self, bucket: Bucket, calls: Sequence[Bucket]) -> None:
        """A step of `bucket`, not compiled, ran as `calls`: ask the compile thread for
        `bucket` once such steps have padded more than its compile costs (`PaddingLedger`)."""
        if self._padding.record(bucket, calls) and bucket not in self._wanted:
            with self._demand:
                self._wanted = [*self._wanted, bucket]
                self._demand.notify()

    def compile_step(self, bucket: Bucket, proceed: Callable[[], bool] = lambda: True) -> None:
        """Compile `bucket`'s forward and the four sampler variants of its row count (with
        and without penalties, scored or not), lowered on the shapes and shardings of the
        inputs serving gives them, and publish them (module docstring). `proceed()` is asked
        between tracing, lowering and compiling the forward (each ~1 s on a CPU): False
        abandons the bucket, to leave the CPU to steps that started meanwhile."""
        step, sampling, _, last = self._input_specs(self._example_inputs(bucket))
        traced = _forward_logits.trace(
            self.weights, self._kv_spec, step, last, cfg=self.cfg, backend=self.backend
        )
        if not proceed():
            return
        lowered = traced.lower()
        if not proceed():
            return
        forward = lowered.compile()
        num_rows = len(last)
        penalties = self._input_specs(PenaltyInput.neutral(num_rows, self.max_model_len))
        logits_spec = forward.out_info[0]
        samplers = {
            (num_rows, scored, p is not None): variant.lower(logits_spec, sampling, p).compile()
            for scored, variant in ((False, _sample), (True, _sample_scored))
            for p in (None, penalties)
            if (num_rows, scored, p is not None) not in self.samplers
        }
        self.samplers = {**self.samplers, **samplers}
        self.forwards = {**self.forwards, bucket: forward}
        self.compiled = self.compiled | {bucket}

    def _input_specs(self, host_inputs: Any) -> Any:
        """The shapes and dtypes of host arrays, with the sharding serving puts them in: what
        a call is lowered on, without a transfer. (Under several processes a `device_put` of
        host data is a collective, which a compile, on one process's thread, must not run.)"""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._input_sharding),
            host_inputs,
        )

    def _compile_page_copy(self, num_pages: int) -> None:
        """Compile the gather and the scatter of `num_pages` pages, as a pair: a scatter
        always takes pages of a size gathered before."""
        page_ids = np.zeros(num_pages, np.int32)
        axis = self.backend.layout.page_axis
        gather = gather_pages.lower(self._kv_spec, page_ids, page_axis=axis).compile()
        scatter = scatter_pages.lower(
            self._kv_spec, page_ids, gather.out_info, page_axis=axis
        ).compile()
        self.page_copies = {**self.page_copies, num_pages: (gather, scatter)}

    @property
    def max_gather_pages(self) -> int:
        """The most pages one `gather` copies without padding beyond its size bucket: the
        largest size up to which every size is compiled (the write-through's cap per copy)."""
        if self._compile_on_demand:
            return self.gather_buckets[-1]
        largest = 0
        for n in self.gather_buckets:
            if n not in self.page_copies:
                break
            largest = n
        return largest

    def page_copy_size(self, num_pages: int) -> int:
        """The compiled page-copy size a copy of `num_pages` pages pads up to: the smallest
        that holds them (their own size bucket, compiled first if still compiled on demand)."""
        n = max(num_pages, 1)
        size = ceil_bucket(self.gather_buckets, n)
        if self._compile_on_demand and size not in self.page_copies:
            self._compile_page_copy(size)
        return ceil_bucket(sorted(self.page_copies), n)
