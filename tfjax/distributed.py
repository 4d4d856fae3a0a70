"""Multi-host model parallel: one model over every process's devices, stepped in lock step.

Under `jax.distributed` each process is its own controller, and a jitted call over a mesh that
spans processes only completes once every process has made the same call on the same inputs,
in the same order. So process 0 alone plans (HTTP server, scheduler, engine, tokenizer), and
its `Runner` hands each step's packed host arrays (`tfjax.runner.HostInputs`) to a `Leader`,
which broadcasts them before the step runs; every other process runs `follow`: receive, call
the same `Runner.run_inputs`, repeat. What touches the device outside steps needs no message,
since every process does it alike from the same flags: loading (each process reads the host
weights and keeps its own shards) and warm-up (one bucket list, one order). The host KV tier is
off with several processes (its page copies would have to be replayed too); shutdown is a STOP
message.

Transport: the coordinator's key-value store, one gRPC round trip per step and no collective,
so nothing compiles and the broadcast cannot deadlock against a step. Message n sits under
`tfjax/step/<n>`: a JSON header (op, bucket, scored, each array's dtype and shape) and the raw
array bytes, never pickle, since anyone who reaches the coordinator can write a key. Process 0
deletes message n - KEPT_MESSAGES when it writes message n: it reads a step's tokens only
after every process has joined that step's collectives, so older messages have been read.

Failure: a worker bumps `tfjax/alive/<i>` every `worker_timeout_s / 4` from the moment it
joins. Process 0's watchdog declares a worker lost when that counter stands still for
`worker_timeout_s` (dead or stopped), or when a step has not completed after `step_timeout_s`
(a worker alive but wedged, or calls that diverged); it calls `on_lost` (every open stream
ends with an error, /health answers 503), gives the error events LOST_EXIT_DELAY_S to reach
clients and exits with WORKER_LOST_EXIT_CODE: a step blocked in a collective with a dead peer
can never finish and cannot be interrupted. JAX's own heartbeat (`heartbeat_timeout_seconds`,
set longer) is the backstop that ends any process whose peers vanished, workers included.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from tfjax.config import Bucket

if TYPE_CHECKING:
    from tfjax.async_engine import AsyncEngine
    from tfjax.runner import HostInputs, Runner

log = logging.getLogger(__name__)

WORKER_LOST_EXIT_CODE = 3
LOST_EXIT_DELAY_S = 1.0  # error events of failed streams reach their clients meanwhile
KEPT_MESSAGES = 8  # step messages left in the store; older ones were read (module docstring)
IDLE_POLL_MS = 1000  # a worker's wait for the next step, before it asks again
HEARTBEATS_PER_TIMEOUT = 4
JAX_HEARTBEAT_FACTOR = 3  # JAX's own heartbeat timeout, in worker timeouts: ours fires first
_STEP_KEY = "tfjax/step/{}"
_ALIVE_KEY = "tfjax/alive/{}"
_HEADER_LEN_BYTES = 4


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Where this process sits in a multi-host run (`jax.distributed.initialize`'s names)."""

    coordinator_address: str  # HOST:PORT of process 0's coordinator; it binds only there
    num_processes: int
    process_id: int
    worker_timeout_s: float = 10.0  # a worker silent this long is lost
    step_timeout_s: float = 120.0  # a step not completed after this long: a worker is lost

    def __post_init__(self) -> None:
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"coordinator address must be HOST:PORT, not {self.coordinator_address!r}"
            )
        if self.num_processes < 1:
            raise ValueError("num_processes must be >= 1")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must be in [0, {self.num_processes})")
        if self.worker_timeout_s <= 0:
            raise ValueError("worker_timeout_s must be > 0")
        if self.step_timeout_s <= 0:
            raise ValueError("step_timeout_s must be > 0")

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def heartbeat_s(self) -> float:
        return self.worker_timeout_s / HEARTBEATS_PER_TIMEOUT


def initialize(cluster: Cluster) -> None:
    """Join the run (blocks until every process has joined); a worker starts beating."""
    keep_stdout_for_python()
    jax_timeout_s = max(1, round(JAX_HEARTBEAT_FACTOR * cluster.worker_timeout_s))
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        # JAX binds the coordinator on every interface by default; bind only where told.
        coordinator_bind_address=cluster.coordinator_address,
        heartbeat_timeout_seconds=jax_timeout_s,
        shutdown_timeout_seconds=jax_timeout_s,
    )
    if not cluster.is_leader:
        threading.Thread(
            target=_beat, args=(_client(), cluster), name="tfjax-heartbeat", daemon=True
        ).start()


WARMUP_BARRIER_TIMEOUT_S = 3600  # the slowest process's start-up compiles, on any machine


def barrier(name: str, timeout_s: float = WARMUP_BARRIER_TIMEOUT_S) -> None:
    """Wait until every process of the run reaches `name` (the coordinator's barrier, no
    collective). Before the first step of a run: processes finish compiling at different
    times, and gloo gives a collective's peers only 30 s to join its first call."""
    _client().wait_at_barrier(name, round(timeout_s * 1000))


def keep_stdout_for_python() -> None:
    """gloo prints its connection lines from C++ to file descriptor 1, but `tfjax serve`'s
    stdout carries its ready line alone (scripts wait for it): point descriptor 1 at stderr
    and give Python's `sys.stdout` a descriptor of its own on the real stdout."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w", buffering=1)


def _client() -> Any:
    # The coordinator's key-value client has no public accessor in jax 0.10; multihost_utils
    # reaches it the same way.
    from jax._src.distributed import global_state

    return global_state.client


def _beat(client: Any, cluster: Cluster) -> None:
    """Bump this worker's counter until the store fails: the process is shutting down, or
    process 0 and its coordinator are gone (JAX's heartbeat then ends this process)."""
    key = _ALIVE_KEY.format(cluster.process_id)
    for beat in itertools.count():
        try:
            client.key_value_set(key, str(beat), allow_overwrite=True)
        except jax.errors.JaxRuntimeError:
            return
        time.sleep(cluster.heartbeat_s)


def encode_step(bucket: Bucket, inputs: HostInputs, *, scored: bool) -> bytes:
    """One step's message: header length, JSON header, then every array's bytes in order."""
    arrays = [np.ascontiguousarray(leaf) for leaf in jax.tree.leaves(inputs)]
    header = {
        "op": "step",
        "bucket": [bucket.tiles, bucket.rows],
        "scored": scored,
        "penalties": inputs[2] is not None,
        "masked": inputs[1].allowed is not None,
        "arrays": [[a.dtype.str, list(a.shape)] for a in arrays],
    }
    return _message(header, arrays)


def encode_stop() -> bytes:
    return _message({"op": "stop", "arrays": []}, [])


def _message(header: dict[str, Any], arrays: list[np.ndarray]) -> bytes:
    head = json.dumps(header).encode()
    parts = [len(head).to_bytes(_HEADER_LEN_BYTES, "little"), head]
    return b"".join(parts + [a.tobytes() for a in arrays])


def decode(message: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(header, arrays) of a message from `encode_step` / `encode_stop`."""
    head_len = int.from_bytes(message[:_HEADER_LEN_BYTES], "little")
    offset = _HEADER_LEN_BYTES + head_len
    header = json.loads(message[_HEADER_LEN_BYTES:offset])
    arrays = []
    for dtype_str, shape in header["arrays"]:
        dtype, count = np.dtype(dtype_str), int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(message, dtype, count, offset).reshape(shape))
        offset += count * dtype.itemsize
    if offset != len(message):
        raise ValueError(f"step message has {len(message) - offset} bytes past its arrays")
    return header, arrays


class Leader:
    """Process 0's side: the runner's `lockstep` (broadcast every step), the watchdog over the
    workers' heartbeats, and the STOP message at shutdown."""

    def __init__(self, cluster: Cluster, client: Any = None) -> None:
        self.cluster = cluster
        self._client = client if client is not None else _client()
        self._num_sent = 0
        self._step_sent_s: float | None = None  # monotonic time of the step in flight
        self._stopped = threading.Event()

    def lead(self, engine: AsyncEngine) -> None:
        """Broadcast `engine`'s steps from now on (warm-up is done) and watch the workers."""
        engine.engine.runner.lockstep = self
        self.watch(engine.stop_with_error)

    def send(self, bucket: Bucket, inputs: HostInputs, *, scored: bool) -> None:
        self._put(encode_step(bucket, inputs, scored=scored))
        self._step_sent_s = time.monotonic()

    def completed(self) -> None:
        self._step_sent_s = None

    def stop(self) -> None:
        """Tell every worker to return, and stop watching them (they stop beating)."""
        self._stopped.set()
        self._put(encode_stop())

    def _put(self, message: bytes) -> None:
        self._client.key_value_set_bytes(_STEP_KEY.format(self._num_sent), message)
        if self._num_sent >= KEPT_MESSAGES:
            self._client.key_value_delete(_STEP_KEY.format(self._num_sent - KEPT_MESSAGES))
        self._num_sent += 1

    def watch(
        self, on_lost: Callable[[str], None], exit_process: Callable[[int], None] = os._exit
    ) -> threading.Thread:
        """Start the watchdog thread; on a lost worker: `on_lost(reason)`, then, after
        LOST_EXIT_DELAY_S, `exit_process(WORKER_LOST_EXIT_CODE)` (no cleanup can run: a
        thread may be blocked in a collective forever)."""

        def run() -> None:
            reason = self._wait_for_lost_worker()
            if reason is None:
                return
            log.error("%s: failing every request and exiting", reason)
            on_lost(reason)
            time.sleep(LOST_EXIT_DELAY_S)
            exit_process(WORKER_LOST_EXIT_CODE)

        thread = threading.Thread(target=run, name="tfjax-watchdog", daemon=True)
        thread.start()
        return thread

    def _wait_for_lost_worker(self) -> str | None:
        """Poll the heartbeats and the step in flight until one stands still too long (the
        reason) or `stop`."""
        timeout_s, step_timeout_s = self.cluster.worker_timeout_s, self.cluster.step_timeout_s
        now = time.monotonic()
        seen = {i: (self._beat_of(i), now) for i in range(1, self.cluster.num_processes)}
        while not self._stopped.wait(self.cluster.heartbeat_s):
            now = time.monotonic()
            step_sent_s = self._step_sent_s
            if step_sent_s is not None and now - step_sent_s > step_timeout_s:
                return f"a step has not completed in {step_timeout_s:g} s"
            for worker, (beat, since) in seen.items():
                latest = self._beat_of(worker)
                if latest != beat:
                    seen[worker] = (latest, now)
                elif now - since > timeout_s:
                    return f"worker process {worker} sent no heartbeat for {timeout_s:g} s"
        return None

    def _beat_of(self, worker: int) -> str | None:
        try:
            return self._client.key_value_try_get(_ALIVE_KEY.format(worker))
        except jax.errors.JaxRuntimeError:  # not written yet, or the store failed: no beat
            return None


def follow(runner: Runner, client: Any = None) -> int:
    """A worker's loop: run every step process 0 broadcasts, in order, until STOP (then 0).
    An error from the store other than an idle wait's deadline ends the process."""
    client = client if client is not None else _client()
    structures: dict[tuple[Bucket, bool, bool], Any] = {}  # built once per bucket, not per step
    num_received = 0
    while True:
        header, arrays = decode(_next_message(client, _STEP_KEY.format(num_received)))
        num_received += 1
        if header["op"] == "stop":
            return 0
        key = (Bucket(*header["bucket"]), header["penalties"], header["masked"])
        if key not in structures:
            structures[key] = runner.input_structure(key[0], with_penalties=key[1], masked=key[2])
        inputs = jax.tree.unflatten(structures[key], arrays)
        runner.run_inputs(key[0], inputs, scored=header["scored"])


def _next_message(client: Any, key: str) -> bytes:
    while True:
        try:
            return client.blocking_key_value_get_bytes(key, IDLE_POLL_MS)
        except jax.errors.JaxRuntimeError as err:
            if "DEADLINE_EXCEEDED" not in str(err):
                raise
