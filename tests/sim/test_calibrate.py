"""Calibrating the simulator's own cost-model runner gives back the profile it runs on."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tfjax.sim import engine_config, get_profile
from tfjax.sim.calibrate import CalibrationPlan, calibrate
from tfjax.sim.clock import VirtualClock
from tfjax.sim.costed import CostedRunner
from tfjax.sim.profiles import profile_from_json, profile_to_json
from tfjax.sim.timed_transfer import TimedTransfers

CPU = get_profile("cpu-smollm2")
PLAN = CalibrationPlan(batches=(1, 8, 32), contexts=(160, 480), chunks=(32, 128, 512))


@pytest.mark.parametrize(
    ("pair_s", "grouped"),
    [(0.0, False), (1.4e-6, False), (1.4e-6, True)],
    ids=["no-pair-price", "pairs-priced", "cpu-grouped-reads"],
)
def test_calibrating_the_cost_model_recovers_its_profile(pair_s: float, grouped: bool) -> None:
    profile = replace(CPU, prefill_pair_s=pair_s, grouped_decode_reads=grouped)
    clock = VirtualClock()
    config = engine_config(profile)
    runner = CostedRunner(
        profile,
        clock,
        config,
        page_size=profile.page_size,
        num_pages=config.num_pages,
        max_model_len=4096,
    )
    links = TimedTransfers(
        clock,
        d2h_bytes_per_s=CPU.d2h_bytes_per_s,
        h2d_bytes_per_s=CPU.h2d_bytes_per_s,
        max_bytes_in_flight=1 << 30,
    )
    lines: list[str] = []
    got = calibrate(
        runner,
        runner,
        links,
        config,
        name="cal",
        grouped_decode_reads=grouped,
        plan=PLAN,
        timer=clock,
        progress=lines.append,
    )
    # every measurement is reported: 3 batches, the long context, 3 chunks and the fewest
    # tokens of the 512-token chunk's 16-tile bucket (129: 4 tiles are the bucket below),
    # copies, planning
    assert len(lines) == 3 + 1 + 3 + 1 + 1 + 1
    assert "prefill 129 tokens" in lines[7]
    assert got.prefill_pair_s == pytest.approx(pair_s, abs=1e-12)
    assert dict(got.decode_table_s) == pytest.approx(dict(CPU.decode_table_s))
    assert got.table_context_tokens == 160
    assert got.grouped_decode_reads is grouped
    assert [n for n, _ in got.prefill_table_s] == [32, 128, 512]  # whole tiles, bucketed
    assert got.mem_bytes_per_s == pytest.approx(CPU.mem_bytes_per_s)
    assert got.flops_per_s / got.flops_per_token == pytest.approx(
        CPU.flops_per_s / CPU.flops_per_token
    )
    assert got.overhead_s == pytest.approx(CPU.overhead_s)
    assert got.d2h_bytes_per_s == pytest.approx(CPU.d2h_bytes_per_s)
    assert got.h2d_bytes_per_s == pytest.approx(CPU.h2d_bytes_per_s)
    assert (got.num_device_pages, got.num_host_pages) == (CPU.num_device_pages, CPU.num_host_pages)
    assert got.plan_s_per_request == 0.0  # planning takes no virtual time
    # Same step times as the profile it measured, at any batch and context.
    for rows, contexts, prompt, pairs in [
        (1, [100], 0, 0),
        (8, [250] * 8, 0, 0),
        (8, [900, 300, 300, 200, 40, 40, 40], 0, 0),  # uneven, a padding row
        (20, [250] * 20, 64, 3000),
        (0, [], 300, 45150),
    ]:
        kwargs = dict(
            num_decode=rows, decode_contexts=contexts, num_prefill=prompt, prefill_pairs=pairs
        )
        assert got.step_s(**kwargs) == pytest.approx(profile.step_s(**kwargs))
    assert profile_from_json(json.loads(json.dumps(profile_to_json(got)))) == got


def test_a_pool_too_small_for_the_long_context_is_an_error() -> None:
    small = replace(CPU, num_device_pages=10)
    clock = VirtualClock()
    config = engine_config(small)
    runner = CostedRunner(small, clock, config, page_size=16, num_pages=11, max_model_len=160)
    links = TimedTransfers(clock, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, max_bytes_in_flight=1)
    with pytest.raises(ValueError, match="10 pages"):
        calibrate(runner, runner, links, config, name="x", plan=PLAN, timer=clock)
