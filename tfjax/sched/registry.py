"""Policies by name, for the engine config, the CLI, the simulator and the benchmarks."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tfjax.sched.andes import AndesConfig, AndesPolicy
from tfjax.sched.base import Policy
from tfjax.sched.fcfs import FcfsPolicy
from tfjax.sched.tokenflow import TokenFlowConfig, TokenFlowPolicy

POLICY_NAMES = ("fcfs", "fcfs-chunked", "andes", "tokenflow")
_FCFS_PARAMS = frozenset({"headroom_pages_per_running", "retract_backoff"})
PARAMS = {
    "fcfs": _FCFS_PARAMS,
    "fcfs-chunked": _FCFS_PARAMS,
    "andes": frozenset(f.name for f in fields(AndesConfig)),
    "tokenflow": frozenset(f.name for f in fields(TokenFlowConfig)),
}


def make_policy(name: str, **params: Any) -> Policy:
    """A fresh policy object (policies keep state between calls: never share one).

    `params` go to the policy's constructor (`PARAMS[name]` lists them): `FcfsPolicy`'s
    keywords for the FCFS pair, `AndesConfig` fields for andes, `TokenFlowConfig` fields for
    tokenflow. A parameter the policy does not take is a ValueError, not silently ignored.
    """
    if name in PARAMS and (unknown := sorted(set(params) - PARAMS[name])):
        raise ValueError(f"policy {name!r} takes no parameter {', '.join(unknown)}")
    if name == "fcfs":
        return FcfsPolicy(chunked=False, **params)
    if name == "fcfs-chunked":
        return FcfsPolicy(chunked=True, **params)
    if name == "andes":
        return AndesPolicy(**params)
    if name == "tokenflow":
        return TokenFlowPolicy(**params)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
