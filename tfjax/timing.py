"""`median_seconds`: how long a call typically takes, for the cost estimates policies and the
simulator plan with (the runner's warm-up, `tfjax calibrate`).

One untimed call first: a first call pays for allocations and threads starting (a batch-8
decode step on the 2-core CPU: 420 ms, against 48-55 ms warm). Then the median, not the
fastest, of the timed calls: a server runs typical steps (the fastest of 15 decode steps was
6-10 % under their median there).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(
    run: Callable[[], object], repeats: int, timer: Callable[[], float] = time.perf_counter
) -> float:
    """The median of `repeats` timed calls of `run`, after one untimed call."""
    run()
    times = []
    for _ in range(repeats):
        start = timer()
        run()
        times.append(timer() - start)
    return statistics.median(times)
