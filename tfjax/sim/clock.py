"""The simulator's clock: virtual seconds that move only when the cost model says so."""

from __future__ import annotations


class VirtualClock:
    """A callable clock (`Engine(clock=...)`) that the cost models advance."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds

    def advance_to(self, t_s: float) -> None:
        self.now_s = max(self.now_s, t_s)
