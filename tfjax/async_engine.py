"""`AsyncEngine`: runs an `Engine` on its own thread and bridges it to asyncio.

Threads: the asyncio event loop (HTTP handlers) calls `submit` / `abort`, which only append
commands to an inbox and wake the engine thread. The engine thread drains the inbox between
steps, runs steps while there is work, and otherwise sleeps on the wake-up event (it never
spins). Deltas go back through `loop.call_soon_threadsafe(queue.put_nowait, delta)`, one
asyncio queue per request, so the event loop does no engine work.

Failures: an exception inside a step ends every live request with an error delta and the
engine carries on with an empty slate (page books are rebuilt by releasing each request). If
steps keep failing (`MAX_CONSECUTIVE_FAILURES` with no successful step between them, idle time
or not), the thread stops and `is_healthy` turns false, so /health reports 503 and a
supervisor can restart the process. However the thread ends, every stream still open then
(including requests still in the inbox) gets an error delta: no client waits forever.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tfjax.api import (
    Delta,
    EngineDeadError,
    EngineStats,
    LiveState,
    PromptTooLongError,
    QueueFullError,
    RequestStream,
)
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.live_state import build_live_state
from tfjax.metrics import COMPILES
from tfjax.request import FinishReason, Request, RequestStatus, SamplingParams

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3
LIVE_STATE_WAIT_S = 0.3  # how long a dashboard refresh waits for the step in progress
_ids = itertools.count()


@dataclass(slots=True)
class _Stream:
    request_id: str
    queue: asyncio.Queue[Delta]

    async def __aiter__(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self.queue.get()
            yield delta
            if delta.finish_reason is not None:
                return


Emit = Callable[[str, Delta], None]


class BackgroundCompiles(Protocol):
    """A runner's table that may still compile buckets while serving
    (`tfjax.executables.Executables`)."""

    def compile_progress(self) -> tuple[int, int]:
        """(buckets compiled, buckets in all)."""
        ...

    def stop_compiling(self, timeout_s: float = ...) -> None:
        """Compile nothing more; wait for the compile in progress."""
        ...


class AsyncEngine:
    def __init__(
        self,
        build: Callable[[Emit], Engine],
        *,
        model_name: str,
        tokenizer: object,
        max_waiting: int,
        compiles: BackgroundCompiles | None = None,
    ) -> None:
        """`build(emit)` makes the engine whose deltas go to `emit`, this object's thread-safe
        forwarder to the requests' asyncio queues (`tfjax.assembly.assemble_engine`).
        `compiles`: the runner's executables, if they compile in the background (stats report
        their progress, and `shutdown` stops them)."""
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta]]] = {}
        self.engine = engine = build(self._emit)
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.max_model_len = engine.runner.max_model_len
        self.max_waiting = max_waiting
        self.compiles = compiles
        self.default_rate = engine.config.default_consumption_rate
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._compiles_at_start = COMPILES.count
        self._stats = EngineStats()
        self._live_pending: Future[LiveState] | None = None
        self._live_latest: LiveState | None = None
        self._stepping = False
        self._last_step_end_s = -math.inf
        self._thread = threading.Thread(target=self._run, name="tfjax-engine", daemon=True)
        self._thread.start()

    # -- EngineClient ----------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stats(self) -> EngineStats:
        return self._stats

    def idle_for(self) -> float:
        """Seconds since the engine thread last ran a step, 0 while it runs one: when the
        background compiles may take the CPU (`Executables.compile_rest_in_background`)."""
        return 0.0 if self._stepping else time.monotonic() - self._last_step_end_s

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        consumption_rate: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        streaming: bool = True,
    ) -> RequestStream:
        if not self.is_healthy:
            raise EngineDeadError("the engine has stopped")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                "including at least one generated token"
            )
        if self._stats.num_waiting + len(self._inbox) >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting")
        if sampling.seed is None:
            sampling = replace(sampling, seed=secrets.randbits(32))
        request = Request(
            request_id=request_id or f"req-{next(_ids)}",
            prompt_ids=list(prompt_ids),
            sampling=sampling,
            arrival_s=self.engine.clock(),
            consumption_rate=consumption_rate or self.default_rate,
            priority=priority,
            streaming=streaming,
        )
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        self._post(lambda: self.engine.add_request(request))
        if self._stop.is_set():  # the thread may have ended its open streams before this one
            self._end_open_streams("the engine has stopped")
        return _Stream(request.request_id, queue)

    def abort(self, request_id: str) -> None:
        self._post(lambda: self.engine.abort(request_id))

    async def check_invariants(self) -> str | None:
        """Run the engine's between-steps invariant check on its thread; None when it holds,
        else what is wrong (for /health?deep=1 and the test suite's idle checks)."""
        if not self.is_healthy:
            return "the engine thread has stopped"
        done: Future[str | None] = Future()

        def check() -> None:
            if not done.set_running_or_notify_cancel():
                return  # the caller stopped waiting (timeout, cancelled handler)
            try:
                self.engine.check_idle()
                done.set_result(None)
            except AssertionError as err:
                done.set_result(f"invariant broken: {err}")

        self._post(check)
        return await asyncio.wrap_future(done)

    async def live_state(self) -> LiveState | None:
        """A snapshot for the dashboard, built on the engine thread after the step in progress.

        Concurrent callers share one build. If the step takes longer than `LIVE_STATE_WAIT_S`,
        the newest snapshot built so far is returned (None before the first), so a page
        refreshing twice a second never waits for a long step and steps never wait for it.
        """
        pending = self._live_pending
        if self.is_healthy and (pending is None or pending.done()):
            pending = self._live_pending = Future()
            self._post(lambda: self._publish_live_state(pending))
        if pending is not None and not pending.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(pending)), LIVE_STATE_WAIT_S
                )
        return self._live_latest

    def stop_with_error(self, message: str) -> None:
        """From any thread, when steps can no longer complete (`tfjax.distributed`: a lost
        worker process): /health turns 503 and every open stream ends with `message`, even
        while the engine thread is blocked inside a step."""
        self._stop.set()
        self._wake.set()
        self._end_open_streams(message)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort everything in flight, stop the engine thread and background compiles."""
        self._post(lambda: [self.engine.abort(r) for r in list(self.engine.requests)])
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self.compiles is not None:
            self.compiles.stop_compiling(timeout_s)

    # -- engine thread ---------------------------------------------------------------------

    def _post(self, command: Callable[[], None]) -> None:
        self._inbox.append(command)
        self._wake.set()

    def _emit(self, request_id: str, delta: Delta) -> None:
        target = (
            self._streams.pop(request_id, None)
            if delta.finish_reason
            else self._streams.get(request_id)
        )
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, delta)

    def _run(self) -> None:
        """The engine thread. However it ends (shutdown, too many failures, a bug), no stream
        is left waiting: those still open get a final error delta."""
        try:
            self._serve()
        finally:
            self._stop.set()
            self._end_open_streams("the engine has stopped")

    def _end_open_streams(self, message: str) -> None:
        for request_id in list(self._streams):
            target = self._streams.pop(request_id, None)
            if target is None:
                continue
            loop, queue = target
            delta = Delta("", (), 0, 0, finish_reason=FinishReason.ERROR, error=message)
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, delta)

    def _serve(self) -> None:
        failures = 0
        while True:
            while self._inbox:
                self._inbox.popleft()()
            if self._stop.is_set():
                break
            try:
                self._stepping = True
                ran = self.engine.has_work and self.engine.step()
                if ran:  # idle wake-ups (aborts, health checks) do not excuse failed steps
                    failures = 0
                    self._last_step_end_s = time.monotonic()
            except Exception as err:  # any step failure must not kill serving
                failures += 1
                log.exception("engine step failed (%d in a row)", failures)
                self.engine.fail_all(f"engine step failed: {err}")
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._stop.set()
                    break
                ran = False
            finally:
                self._stepping = False
            self._stats = self._snapshot()
            if not ran:
                if not self.engine.has_work:
                    self.engine.check_idle()
                self._wake.wait(timeout=None if not self.engine.has_work else 0.005)
                self._wake.clear()

    def _publish_live_state(self, done: Future[LiveState]) -> None:
        engine = self.engine
        host = engine.kv.host
        state = build_live_state(
            engine.requests,
            now_s=engine.clock(),
            policy=engine.policy.name,
            stats=self._stats,
            last_decision=engine.last_decision,
            page_size=engine.runner.page_size,
            host_synced_tokens=host.num_synced_tokens if host is not None else None,
        )
        self._live_latest = state
        done.set_result(state)

    def _snapshot(self) -> EngineStats:
        engine = self.engine
        offload = self._offload_stats()
        extra = {**offload.pop("extra", {}), **_grammar_stats(engine.runner)}
        compiled, total = self.compiles.compile_progress() if self.compiles else (0, 0)
        return EngineStats(
            num_waiting=engine.count(RequestStatus.WAITING),
            num_running=engine.count(RequestStatus.RUNNING)
            + engine.count(RequestStatus.PREFILLING),
            num_preempted=engine.count(RequestStatus.PREEMPTED),
            device_pages_used=engine.kv.num_used_pages,
            device_pages_total=engine.kv.device.num_usable,
            num_preemptions=engine.kv.stats.num_preemptions,
            num_compiles_after_warmup=COMPILES.count - self._compiles_at_start,
            num_generated_tokens=engine.num_generated_tokens,
            effective_tokens=engine.effective_tokens,
            num_steps=engine.num_steps,
            host_copy_s=engine.kv.stats.copy_s,
            page_size=engine.runner.page_size,
            num_compiled_buckets=compiled,
            num_buckets=total,
            **engine.kv.prefix_stats(),
            **offload,
            extra=extra,
        )

    def _offload_stats(self) -> dict[str, object]:
        kv = self.engine.kv
        if kv.offload is None:
            return {}
        stats, links = kv.stats, kv.offload.transfers
        return dict(
            host_pages_used=kv.offload.host.num_request_pages,
            host_pages_total=kv.offload.host.num_total_pages,
            offload_bytes_d2h=links.d2h.bytes_done,
            offload_bytes_h2d=links.h2d.bytes_done,
            extra={
                "swap_preemptions": stats.num_swap_preemptions,
                "host_full_fallbacks": stats.num_host_full_fallbacks,
                "loads": stats.num_loads,
                "preempt_seconds_total": stats.preempt_s,
                "load_seconds_total": stats.load_s,
                "resume_seconds_total": stats.resume_s,
                "resumes_timed": stats.num_resumes_timed,
            },
        )


def _grammar_stats(runner: object) -> dict[str, float]:
    """Host time spent filling structured-output masks (`tfjax.runner.Runner.mask_s`), for
    /metrics; runners without grammars (fakes, the simulator's) have none."""
    if not hasattr(runner, "mask_s"):
        return {}
    return {
        "grammar_mask_seconds_total": runner.mask_s,
        "grammar_masked_steps": runner.num_masked_steps,
    }


def build_runner(args: argparse.Namespace, *, warmup: bool = True) -> tuple[Any, Any, Any]:
    """(model, engine config, warmed-up `Runner`) for the model and engine flags in `args`:
    what `tfjax serve` and `tfjax calibrate` run. With `compile_in_background` (the default)
    the warm-up compiles only the start-up buckets (`tfjax.compile_plan`): the caller starts
    `runner.executables.compile_rest_in_background()` once it serves."""
    from tfjax.config import engine_config_from_args
    from tfjax.runner_setup import load_runner

    config = engine_config_from_args(args)
    model, runner = load_runner(
        args.model,
        config,
        dtype=getattr(args, "dtype", None),
        quantization=getattr(args, "quantization", None),
    )
    if warmup:
        warm_up(runner, config)
    return model, config, runner


def warm_up(runner: Any, config: EngineConfig) -> None:
    """Compile what serving needs first, with a progress bar: the start-up buckets when the
    rest compile in the background (`config.compile_in_background`), else every bucket."""
    from tfjax.compile_plan import startup_buckets
    from tfjax.progress import ProgressBar

    first = startup_buckets(config) if config.compile_in_background else None
    runner.warmup(ProgressBar("step buckets"), first=first)


def build_engine(args: argparse.Namespace) -> AsyncEngine:
    """Load the model named by `args.model`, compile the start-up buckets (or all of them),
    start the engine thread and the compiles of the other buckets."""
    model, config, runner = build_runner(args)
    return serve_runner(runner, config, model_name=model.name, tokenizer=model.tokenizer)


def serve_runner(
    runner: Any,
    config: EngineConfig,
    *,
    model_name: str,
    tokenizer: Any,
    max_waiting: int | None = None,
) -> AsyncEngine:
    """The engine thread over a warmed-up `Runner` (`config`'s policy, host tier and real
    transfer links), then the compiles of the buckets its warm-up left out: what `tfjax serve`
    runs, also for `tfjax bench burst`'s random weights (`tokenizer` None: no text)."""
    from tfjax.assembly import assemble_engine, device_transfers

    served = AsyncEngine(
        lambda emit: assemble_engine(
            runner,
            runner,
            tokenizer,
            config,
            transfers=device_transfers(runner.pages_sharding),
            emit=emit,
            model_id=model_name,
        ),
        model_name=model_name,
        tokenizer=tokenizer,
        max_waiting=max_waiting or config.max_waiting,
        compiles=runner.executables,
    )
    runner.executables.compile_rest_in_background(served.idle_for)
    return served
