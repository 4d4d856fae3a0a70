"""`TimedTransfers`: the host links as the profile models them, on the virtual clock.

It implements `tfjax.kv.transfer.TransferIO`, like the real `Transfers`. Each direction is a
FIFO link: a copy starts when the link is free (and, for a load, once the host copy it reads
exists and, without load-evict overlap, once every queued eviction is done) and takes its
bytes over the profile's bandwidth. Its future is done once the clock passes its end, so
the engine sees copies complete exactly as it would see worker threads finish.

Where the profile's host copies share the step's cores (`CostProfile.host_copies_share_compute`,
a CPU), a copy also moves the clock by its own duration when it is queued: the engine, which
would have run its steps on those cores meanwhile, is that much later. (On a CPU a gathered
copy is a memcpy the worker thread runs beside the step; the calibrated bandwidth includes
the gather.)
"""

from __future__ import annotations

from collections import deque
from typing import Any

from tfjax.kv.transfer import LinkBudget
from tfjax.sim.clock import VirtualClock


class TimedFuture:
    """A copy that completes at `done_at_s` of `clock` (the `Future` API the engine uses)."""

    __slots__ = ("_clock", "done_at_s", "value")

    def __init__(self, clock: VirtualClock, done_at_s: float, value: Any) -> None:
        self._clock = clock
        self.done_at_s = done_at_s
        self.value = value  # what `result` returns once done

    def done(self) -> bool:
        return self._clock.now_s >= self.done_at_s

    def result(self) -> Any:
        """Waiting for a copy lets virtual time pass until it is done (the engine never
        waits: it asks `done` first; `tfjax.sim.calibrate` waits)."""
        self._clock.advance_to(self.done_at_s)
        return self.value


class TimedLink:
    """One direction: copies back to back at `bytes_per_s`."""

    def __init__(self, clock: VirtualClock, bytes_per_s: float, *, shares_compute: bool) -> None:
        self._clock = clock
        self.bytes_per_s = bytes_per_s
        self.shares_compute = shares_compute
        self.free_at_s = clock.now_s
        self.bytes_done = 0
        self._queued: deque[tuple[float, int]] = deque()  # (end, bytes), ends ascending
        self._queued_bytes = 0

    def submit(self, value: Any, nbytes: int, not_before_s: float = 0.0) -> TimedFuture:
        start = max(self._clock.now_s, self.free_at_s, not_before_s)
        self.free_at_s = start + nbytes / self.bytes_per_s
        if self.shares_compute:
            self._clock.advance(nbytes / self.bytes_per_s)
        self._queued.append((self.free_at_s, nbytes))
        self._queued_bytes += nbytes
        return TimedFuture(self._clock, self.free_at_s, value)

    @property
    def bytes_in_flight(self) -> int:
        now, queued = self._clock.now_s, self._queued
        while queued and queued[0][0] <= now:
            self._queued_bytes -= queued[0][1]
            self.bytes_done += queued.popleft()[1]
        return self._queued_bytes

    def next_completion_s(self) -> float | None:
        return self._queued[0][0] if self.bytes_in_flight else None


class TimedTransfers(LinkBudget):
    def __init__(
        self,
        clock: VirtualClock,
        *,
        d2h_bytes_per_s: float,
        h2d_bytes_per_s: float,
        max_bytes_in_flight: int,
        shares_compute: bool = False,
    ) -> None:
        self.max_bytes_in_flight = max_bytes_in_flight
        self.d2h = TimedLink(clock, d2h_bytes_per_s, shares_compute=shares_compute)
        self.h2d = TimedLink(clock, h2d_bytes_per_s, shares_compute=shares_compute)

    def offload(self, pages: Any) -> TimedFuture:
        return self.d2h.submit(pages, pages.nbytes)

    def load(
        self, host_pages: TimedFuture, nbytes: int, *, after_evictions: bool = False
    ) -> TimedFuture:
        ready = host_pages.done_at_s
        if after_evictions:
            ready = max(ready, self.d2h.free_at_s)
        return self.h2d.submit(host_pages.value, nbytes, ready)

    def next_completion_s(self) -> float | None:
        """When the next queued copy completes (None: both links idle)."""
        ends = [t for t in (self.d2h.next_completion_s(), self.h2d.next_completion_s()) if t]
        return min(ends) if ends else None

    def shutdown(self) -> None:
        pass
