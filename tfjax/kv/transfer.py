"""Device <-> pinned-host copies on worker threads, and the jitted page gather/scatter.

The only JAX in `tfjax/kv/`. Rules (serving-anchors notes §3):
- Workers never touch the live KV cache: it is donated to every step, so a worker holding it
  would read a deleted buffer. The engine thread first gathers the pages to save into a fresh
  array (`gather_pages`, jitted and bucketed) and hands that array to a worker, which runs
  `jax.device_put(buf, <pinned_host sharding>)` and waits for it.
- Loads run the other way: a worker puts the host array back on the device, and the engine
  thread scatters it into freshly allocated pages (`scatter_pages`, KV donated) once the copy
  is done; the engine thread never waits for it.
- Each direction has one worker thread (copies in one direction serialize on the link
  anyway), and bytes in flight are capped: `room_bytes` tells the write-through how much
  room is left.
Bandwidth is measured per direction (EWMA of completed copies) and fed to the policies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from models.llama import KVCache

EWMA_ALPHA = 0.3


@partial(jax.jit, static_argnames=("page_axis",))
def gather_pages(kv: KVCache, page_ids_N: jax.Array, *, page_axis: int) -> jax.Array:
    """Copy pages out of every layer: [L, A, N, ...] (A arrays per layer, page axis first)."""
    with jax.named_scope("kv_gather"):
        return jnp.stack(
            [
                jnp.stack(
                    [jnp.moveaxis(a.take(page_ids_N, axis=page_axis), page_axis, 0) for a in layer]
                )
                for layer in kv.layers
            ]
        )


def _scatter(kv: KVCache, page_ids_N: jax.Array, pages_LxAxN: jax.Array, *, page_axis: int):
    with jax.named_scope("kv_scatter"):
        index = (slice(None),) * page_axis + (page_ids_N,)
        return KVCache(
            layers=[
                tuple(
                    a.at[index].set(jnp.moveaxis(pages_LxAxN[i, j], 0, page_axis))
                    for j, a in enumerate(layer)
                )
                for i, layer in enumerate(kv.layers)
            ]
        )


scatter_pages = jax.jit(_scatter, static_argnames=("page_axis",), donate_argnames=("kv",))


class _Link:
    """One direction of the host link: a worker thread, bytes in flight and bandwidth."""

    def __init__(self, name: str, initial_bytes_per_s: float) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tfjax-{name}")
        self._lock = threading.Lock()
        self.bytes_in_flight = 0
        self.bytes_done = 0
        self.bytes_per_s = initial_bytes_per_s

    def submit(
        self, source: Callable[[], jax.Array], nbytes: int, sharding: jax.sharding.Sharding
    ) -> Future[jax.Array]:
        """Copy `source()` (resolved on the worker, so it may wait there) to `sharding`."""
        with self._lock:
            self.bytes_in_flight += nbytes
        return self._pool.submit(self._copy, source, sharding, nbytes)

    def _copy(
        self, source: Callable[[], jax.Array], sharding: jax.sharding.Sharding, nbytes: int
    ) -> jax.Array:
        try:
            array = source()
            start = time.perf_counter()
            out = jax.device_put(array, sharding)
            out.block_until_ready()
        finally:
            with self._lock:
                self.bytes_in_flight -= nbytes
        seconds = max(time.perf_counter() - start, 1e-6)
        with self._lock:
            self.bytes_done += nbytes
            self.bytes_per_s += EWMA_ALPHA * (nbytes / seconds - self.bytes_per_s)
        return out

    def drain(self) -> None:
        """Block until every copy submitted so far has finished."""
        self._pool.submit(lambda: None).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class LinkState(Protocol):
    bytes_per_s: float  # measured (or modelled) bandwidth of this direction
    bytes_done: int


class TransferIO(Protocol):
    """What `KVManager` and `Engine` need from the host links: implemented by `Transfers`
    (worker threads) and by the simulator's `TimedTransfers` (the virtual clock)."""

    d2h: LinkState
    h2d: LinkState

    def offload(self, pages: Any) -> Future[Any]: ...

    def load(
        self, host_pages: Future[Any], nbytes: int, *, after_evictions: bool = False
    ) -> Future[Any]: ...

    def room_bytes(self) -> int: ...

    def backlog_s(self) -> float: ...

    def shutdown(self) -> None: ...


class LinkBudget:
    """Room and backlog of a D2H/H2D link pair: shared by `Transfers` and the simulator's
    `TimedTransfers`, whose links both count `bytes_in_flight` at a `bytes_per_s`."""

    max_bytes_in_flight: int
    d2h: Any
    h2d: Any

    def room_bytes(self) -> int:
        return max(0, self.max_bytes_in_flight - self.d2h.bytes_in_flight)

    def backlog_s(self) -> float:
        return (
            self.d2h.bytes_in_flight / self.d2h.bytes_per_s
            + self.h2d.bytes_in_flight / self.h2d.bytes_per_s
        )


class Transfers(LinkBudget):
    """The two links between device memory and pinned host memory (a `TransferIO`)."""

    def __init__(self, pages_sharding: jax.sharding.Sharding, *, max_bytes_in_flight: int) -> None:
        """`pages_sharding`: how gathered pages lie on the device(s) (`Runner.pages_sharding`);
        their host copies keep the same split, in pinned host memory."""
        self.device_sharding = pages_sharding
        self.host_sharding = pages_sharding.with_memory_kind("pinned_host")
        self.max_bytes_in_flight = max_bytes_in_flight
        self.d2h = _Link("d2h", initial_bytes_per_s=5e9)
        self.h2d = _Link("h2d", initial_bytes_per_s=5e9)

    def offload(self, pages: jax.Array) -> Future[jax.Array]:
        """Start copying gathered pages to pinned host memory."""
        return self.d2h.submit(lambda: pages, pages.nbytes, self.host_sharding)

    def load(
        self, host_pages: Future[jax.Array], nbytes: int, *, after_evictions: bool = False
    ) -> Future[jax.Array]:
        """Start copying host pages back into device memory (for `scatter_pages`). The H2D
        worker, not the caller, waits for the host copy to exist and, with
        `after_evictions` (no load-evict overlap), for every eviction queued before."""

        def source() -> jax.Array:
            if after_evictions:
                self.d2h.drain()
            return host_pages.result()

        return self.h2d.submit(source, nbytes, self.device_sharding)

    def shutdown(self) -> None:
        self.d2h.shutdown()
        self.h2d.shutdown()
