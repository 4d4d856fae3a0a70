"""Policy names, and the rule that the scheduler package never imports JAX."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tfjax.sched.registry import POLICY_NAMES, make_policy


def test_make_policy() -> None:
    for name in POLICY_NAMES:
        assert make_policy(name).name == name
    assert make_policy("tokenflow", hysteresis_s=0.5).config.hysteresis_s == 0.5
    assert make_policy("andes", trigger_kv_usage=0.8).config.trigger_kv_usage == 0.8
    assert make_policy("fcfs").chunked is False and make_policy("fcfs-chunked").chunked
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="schedule_interval_s"):
        make_policy("fcfs", schedule_interval_s=1.0)


def test_sched_imports_without_jax() -> None:
    """The policies do; the simulator runs the engine, so it needs JAX."""
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "import tfjax.sched.base, tfjax.sched.fcfs, tfjax.sched.andes\n"
        "import tfjax.sched.tokenflow, tfjax.sched.registry\n"
        "import tfjax.qos\n"
        "assert 'jax' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
