"""A one-line progress bar with an ETA, for the minutes a cold start spends compiling.

`ProgressBar` has the `on_compiled(done, total)` signature of `Runner.warmup`. It rewrites one
line with a carriage return (padded with spaces, no terminal escapes, so a log file holds a
single readable line too) and ends it with a summary:

    compiling step buckets [##########----------] 7/19  ETA 0:41
    compiled 19 step buckets in 63.2 s

The ETA assumes the remaining buckets cost the mean of those done so far. `verbs` names the
work for other uses (`tfjax bench` counts finished requests: "running requests [...]").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class ProgressBar:
    def __init__(
        self,
        what: str,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: int = 20,
        verbs: tuple[str, str] = ("compiling", "compiled"),
    ) -> None:
        self.what = what
        self.doing, self.finished = verbs
        self.stream = stream or sys.stderr
        self.clock = clock
        self.width = width
        self._start = clock()
        self._shown = 0  # length of the text on the line now
        self._show(f"{self.doing} {what} ...")

    def __call__(self, done: int, total: int) -> None:
        elapsed = self.clock() - self._start
        if done >= total:
            self._show(f"{self.finished} {total} {self.what} in {elapsed:.1f} s", end="\n")
            return
        filled = self.width * done // max(1, total)
        eta = elapsed / done * (total - done) if done else None
        eta_text = "?" if eta is None else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        bar = "#" * filled + "-" * (self.width - filled)
        self._show(f"{self.doing} {self.what} [{bar}] {done}/{total}  ETA {eta_text}")

    def _show(self, text: str, end: str = "") -> None:
        padding = " " * max(0, self._shown - len(text))
        self.stream.write(f"\r{text}{padding}{end}")
        self.stream.flush()
        self._shown = 0 if end else len(text)
