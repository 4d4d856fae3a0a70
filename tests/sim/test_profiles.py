"""Profiles reproduce their stated figures."""

from __future__ import annotations

from dataclasses import replace

import pytest

from models.attention import cpu_decode_keys
from tfjax.sim import PROFILES, engine_config, get_profile
from tfjax.sim.costed import step_price
from tfjax.sim.profiles import attention_pairs


def test_cpu_profile_matches_the_engine_benchmark() -> None:
    cpu = get_profile("cpu-smollm2")
    assert "bench_engine.py" in cpu.source
    # The measured steps at the benchmark's context (~160 tokens a row), linear in between.
    assert cpu.step_s(num_decode=1, decode_contexts=[160]) == pytest.approx(0.0462)
    assert cpu.step_s(num_decode=8, decode_contexts=[160] * 8) == pytest.approx(0.1363)
    assert cpu.step_s(num_decode=32, decode_contexts=[160] * 32) == pytest.approx(0.2909)
    assert cpu.step_s(num_decode=20) == pytest.approx((0.1363 + 0.2909) / 2)
    # A longer context reads more KV: 1000 extra tokens of 46 KiB at 22.3 GB/s.
    longer = cpu.step_s(num_decode=1, decode_contexts=[1160]) - 0.0462
    assert longer == pytest.approx(1000 * 46080 / 22.3e9)
    # Prefill at the measured 363 tok/s on top of the step.
    assert cpu.step_s(num_decode=0, num_prefill=1) == pytest.approx(0.0462)
    assert 1 / (cpu.step_s(num_decode=0, num_prefill=1001) - 0.0462) * 1000 == (
        pytest.approx(363, rel=0.01)
    )
    assert cpu.num_device_pages == 2047 and cpu.max_batch_size == 32


def test_gpu_profiles() -> None:
    h200 = get_profile("h200-llama3-8b")
    assert 195_000 < h200.device_kv_tokens < 205_000  # mem-frac 0.3 minus 16 GB of weights
    assert h200.kv_bytes_per_token == 128 * 1024
    # Batch 1 decode is bound by reading 16 GB of weights at 80% of 4.8 TB/s, plus overhead.
    assert h200.step_s(num_decode=1) == pytest.approx(16.06 / 3840 + 1e-3)
    rtx = get_profile("rtx4090-llama3-8b")
    assert rtx.d2h_bytes_per_s < h200.d2h_bytes_per_s  # PCIe 4.0 vs 5.0
    assert 40_000 < rtx.device_kv_tokens < 60_000
    for p in PROFILES.values():
        costs = p.costs(500)
        assert costs.decode_step_time(8) == pytest.approx(
            p.step_s(num_decode=8, decode_contexts=[500] * 8)
        )
        assert p.step_s(num_decode=0) == 0.0
    with pytest.raises(ValueError):
        get_profile("tpu")


def test_a_measured_prefill_table_prices_steps_piecewise_linearly() -> None:
    cpu = replace(
        get_profile("cpu-smollm2"),
        overhead_s=0.010,
        decode_table_s=((1, 0.030), (8, 0.060)),
        table_context_tokens=64,
        prefill_table_s=((32, 0.050), (128, 0.090)),
    )

    def prefill(n: int) -> float:
        return cpu.step_s(num_decode=0, num_prefill=n)

    assert prefill(32) == pytest.approx(0.050) and prefill(128) == pytest.approx(0.090)
    assert prefill(80) == pytest.approx(0.070)  # between the points
    assert prefill(16) == pytest.approx(0.030)  # from the step overhead up to the first point
    assert prefill(224) == pytest.approx(0.130)  # the last segment's slope beyond the table
    # A step that also decodes pays the fixed step cost once: decode row + prompt tokens.
    mixed = cpu.step_s(num_decode=1, decode_contexts=[64], num_prefill=80)
    assert mixed == pytest.approx(0.030 + 0.070 - 0.010)


def test_prefill_attention_is_priced_by_its_real_pairs_not_its_bucket() -> None:
    """Two chunks padded into one 16-tile bucket cost the same dense work; what differs is the
    (token, key) pairs they attend to, worked out by hand."""
    cpu = replace(
        get_profile("cpu-smollm2"),
        overhead_s=0.010,
        decode_table_s=((1, 0.030), (8, 0.060)),
        table_context_tokens=64,
        prefill_table_s=((512, 0.600),),
        prefill_pair_s=1e-6,
    )
    config = engine_config(cpu)
    assert attention_pairs(0, 3) == 1 + 2 + 3
    assert attention_pairs(10, 2) == 11 + 12
    # 138 and 512 tokens both pad to 16 tiles of 32 (512 tokens): 0.600 s of dense work.
    assert step_price(cpu, config, [(0, 138)], []) == pytest.approx(0.600 + 138 * 139 / 2e6)
    assert step_price(cpu, config, [(0, 512)], []) == pytest.approx(0.600 + 512 * 513 / 2e6)
    # A later chunk of a long prompt reads the keys before it too.
    later = step_price(cpu, config, [(1000, 138)], [])
    assert later == pytest.approx(0.600 + (138 * 1000 + 138 * 139 / 2) / 1e6)


def test_a_cpu_profile_prices_the_keys_its_kernel_reads() -> None:
    """Decode rows of 300, 100 and 50 tokens in a 4-row bucket: the CPU kernel runs them
    longest first in groups of 1, 1 and 2 rows, each row of a group reading its longest
    row's keys in whole blocks of 128: 384 + 128 + 2 * 128 = 768 keys, where their contexts
    hold 450 tokens. The table was measured at 64 tokens a row (4 * 128 keys read), so the
    grouped step pays 256 keys' KV beyond it; priced by context, 450 - 4 * 64 = 194."""
    assert cpu_decode_keys([300, 100, 50], 4) == 768
    assert cpu_decode_keys([128] * 8, 8) == 8 * 128
    assert cpu_decode_keys([129] + [1] * 7, 8) == 256 + 128 + 2 * 128 + 4 * 128
    profile = replace(get_profile("cpu-smollm2"), table_context_tokens=64)
    grouped = replace(profile, grouped_decode_reads=True)
    per_key = profile.kv_bytes_per_token / profile.mem_bytes_per_s
    base = profile.step_s(num_decode=4)
    assert grouped.step_s(num_decode=4, decode_contexts=[300, 100, 50]) == pytest.approx(
        base + 256 * per_key
    )
    assert profile.step_s(num_decode=4, decode_contexts=[300, 100, 50]) == pytest.approx(
        base + (450 - 4 * 64) * per_key
    )
