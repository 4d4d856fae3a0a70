"""Discrete-event simulator: the real `Engine` on a virtual clock and a cost model.

`clock` is the virtual clock, `costed` the cost-model runner (step time from a profile),
`timed_transfer` the host links as the profile models them, `profiles` the cost models, `workload`
the request streams, `driver` the loop that feeds arrivals to the engine (or to several replicas
behind a router) and summarizes with `tfjax.qos`, and `trace_diff` prices a live step trace
(`tfjax.step_trace`) on a profile to show where the two part ways. Policies, page books, host tier
and the step logic are the engine's own code: nothing here re-implements them.
"""

from tfjax.sim.driver import SimResult, SimStuckError, engine_config, simulate
from tfjax.sim.profiles import PROFILES, CostProfile, get_profile
from tfjax.sim.workload import LengthDist, WorkloadSpec, load_trace, make_requests

__all__ = [
    "PROFILES",
    "CostProfile",
    "LengthDist",
    "SimResult",
    "SimStuckError",
    "WorkloadSpec",
    "engine_config",
    "get_profile",
    "load_trace",
    "make_requests",
    "simulate",
]
