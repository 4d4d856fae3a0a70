"""Process-wide XLA compile counter: a compile on the serving path is a bug (every dynamic
shape is bucketed, tfjax/config.py, and a step whose bucket is not compiled yet runs in
compiled ones, tfjax/compile_plan.py).

`jax.monitoring` reports every backend compile, on the thread that compiles. The engine
records `count` when warm-up ends and exports `compiles_after_warmup` to /metrics, and tests
assert it stays flat. Compiles on a thread inside `background()` (the runner compiling the
rest of its buckets while serving) are counted apart, in `background_count`, so that
`count` still means "a compile that slipped through on the serving path".
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _BackgroundFlag(threading.local):
    active = False  # per thread: inside `_CompileCounter.background()`


class _CompileCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._background = _BackgroundFlag()
        self.count = 0
        self.background_count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Count this thread's compiles in `background_count` while inside."""
        self._background.active = True
        try:
            yield
        finally:
            self._background.active = False

    def _on_event(self, event: str, duration_s: float, **_: object) -> None:
        if event != _BACKEND_COMPILE_EVENT:
            return
        with self._lock:
            if self._background.active:
                self.background_count += 1
            else:
                self.count += 1


COMPILES = _CompileCounter()
