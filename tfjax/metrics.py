"""Process-wide XLA compile counter: a compile while serving is a bug (every dynamic shape is
bucketed and compiled at start-up, tfjax/config.py).

`jax.monitoring` reports every backend compile; the engine records the count when warm-up
ends and exports `compiles_after_warmup` to /metrics, and tests assert it stays flat.
"""

from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _CompileCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_s: float, **_: object) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1


COMPILES = _CompileCounter()
