"""`StepTrace`: one JSON line per engine step, the same from `tfjax serve` and `tfjax simulate`.

Set `TFJAX_STEP_TRACE=FILE` and the engine appends, after each step that ran, when it started
and how long it took on the engine's clock (monotonic seconds live, virtual seconds
simulated), what decides its bucket and price (each prefill chunk's tokens and the tokens
computed before it, the decode rows and each row's context tokens), the requests it moved
(preempted, resumed, admitted) and what the policy reports of its decision (`trace_fields()`,
where it has one: TokenFlow's mode, capacity and demand). Because the simulator runs the
same engine, a live trace and a simulated one of the same workload line up step by step:
where their step times differ for equal sizes the cost profile is wrong, where their sizes
differ the timeline has diverged earlier (`tfjax.sim.trace_diff` reads both).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from tfjax.kv.manager import StepWork
from tfjax.sched.base import Plan

ENV_VAR = "TFJAX_STEP_TRACE"


class StepTrace:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("w", buffering=1)  # a line per step, flushed

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get(ENV_VAR)
        return cls(Path(path)) if path else None

    def record(
        self,
        start_s: float,
        seconds: float,
        plan: Plan,
        work: StepWork,
        policy_fields: Mapping[str, object] | None = None,
    ) -> None:
        self._file.write(
            json.dumps(
                {
                    "start_s": round(start_s, 6),
                    "seconds": round(seconds, 6),
                    "prefill": [w.num_tokens for w in work.prefill],
                    "prefill_context": [w.request.num_computed_tokens for w in work.prefill],
                    "decode_rows": len(work.decode),
                    "decode_contexts": [r.num_tokens for r in work.decode],
                    "preempted": len(plan.preempt),
                    "resumed": len(plan.resume),
                    "admitted": len(plan.admit),
                    **(policy_fields or {}),
                }
            )
            + "\n"
        )
