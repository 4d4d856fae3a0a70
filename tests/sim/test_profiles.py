"""Profiles reproduce their stated figures."""

from __future__ import annotations

import pytest

from tfjax.sim import PROFILES, get_profile


def test_cpu_profile_matches_the_design_notes() -> None:
    cpu = get_profile("cpu-smollm2")
    assert "provisional, from DESIGN.md notes" in cpu.source
    assert cpu.step_s(num_decode=1, context_tokens=0) == pytest.approx(0.029, rel=0.02)
    assert cpu.step_s(num_decode=32, context_tokens=0) == pytest.approx(0.153, rel=0.02)


def test_gpu_profiles() -> None:
    h200 = get_profile("h200-llama3-8b")
    assert 195_000 < h200.device_kv_tokens < 205_000  # mem-frac 0.3 minus 16 GB of weights
    assert h200.kv_bytes_per_token == 128 * 1024
    # Batch 1 decode is bound by reading 16 GB of weights at 80% of 4.8 TB/s, plus overhead.
    assert h200.step_s(num_decode=1, context_tokens=0) == pytest.approx(16.06 / 3840 + 1e-3)
    rtx = get_profile("rtx4090-llama3-8b")
    assert rtx.d2h_bytes_per_s < h200.d2h_bytes_per_s  # PCIe 4.0 vs 5.0
    assert 40_000 < rtx.device_kv_tokens < 60_000
    for p in PROFILES.values():
        costs = p.costs(500)
        assert costs.decode_step_time(8) == pytest.approx(
            p.step_s(num_decode=8, context_tokens=4000)
        )
        assert p.step_s(num_decode=0, context_tokens=0) == 0.0
    with pytest.raises(ValueError):
        get_profile("tpu")
