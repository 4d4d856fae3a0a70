"""Discrete-event simulator: the real policies and page allocator against a cost model.

`workload` makes requests, `profiles` holds cost models, `executor` applies plans, `loop`
runs the event loop and summarizes with `tfjax.qos`.
"""

from tfjax.sim.executor import Executor, PlanError, SimConfig
from tfjax.sim.loop import SimResult, SimStuckError, simulate
from tfjax.sim.profiles import PROFILES, CostProfile, get_profile
from tfjax.sim.workload import LengthDist, WorkloadSpec, load_trace, make_requests

__all__ = [
    "PROFILES",
    "CostProfile",
    "Executor",
    "LengthDist",
    "PlanError",
    "SimConfig",
    "SimResult",
    "SimStuckError",
    "WorkloadSpec",
    "get_profile",
    "load_trace",
    "make_requests",
    "simulate",
]
