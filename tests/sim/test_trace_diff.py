"""The step trace and its pricing: a simulated trace priced by its own profile is the
simulated time, and a hand-made trace is priced and gapped as worked out by hand."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from models.attention import QUERY_TILE
from tfjax.sched.registry import make_policy
from tfjax.sim import LengthDist, WorkloadSpec, get_profile, make_requests, simulate
from tfjax.sim.driver import engine_config
from tfjax.sim.profiles import load_profile, profile_to_json
from tfjax.sim.trace_diff import (
    load_trace,
    served_step_factor,
    step_noise_sigma,
    summarize_trace,
)
from tfjax.sim.trace_diff import main as trace_diff_main
from tfjax.step_trace import ENV_VAR

CPU = get_profile("cpu-smollm2")


def burst(num_requests: int, *, new_tokens: int) -> WorkloadSpec:
    """Prompts of ~90 tokens (+-40), all at once, fast readers."""
    return WorkloadSpec(
        arrival="burst",
        num_requests=num_requests,
        input_len=LengthDist(mean=90, std=40),
        output_len=LengthDist(mean=new_tokens, std=0),
        rates="15",
    )


def test_a_simulated_trace_is_priced_at_exactly_what_the_simulator_charged(
    tmp_path, monkeypatch
) -> None:
    """On a profile that prices attention pairs and serving (so each chunk's recorded context
    counts), and from the trace, the serving factor it was simulated with."""
    profile = replace(CPU, prefill_pair_s=1e-6, served_step_factor=1.1)
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv(ENV_VAR, str(path))
    result = simulate(make_policy("fcfs"), make_requests(burst(12, new_tokens=12)), profile)
    trace = load_trace(path)
    assert len(trace) == result.stats["num_steps"]
    summary = summarize_trace(trace, profile, engine_config(profile))
    kinds = {k.kind: k for k in summary.kinds}
    assert kinds["prefill"].steps and kinds["decode"].steps
    for k in summary.kinds:
        if k.steps:
            assert k.ratio == pytest.approx(1.0, rel=1e-4)
            assert k.median_ratio == pytest.approx(1.0, rel=1e-4)
    assert sum(k.measured_s for k in summary.kinds) == pytest.approx(
        result.stats["busy_s"], rel=1e-4
    )
    # No step's chunks need more than the budget's 16 tiles of 32 tokens (or 512 tokens).
    assert all(sum(-(-n // QUERY_TILE) for n in s["prefill"]) <= 16 for s in trace)
    assert all(sum(s["prefill"]) <= 512 for s in trace)
    assert max(len(s["prefill"]) for s in trace) > 1  # steps did pack several chunks
    assert any(c for s in trace for c in s["prefill_context"])  # and continued prompts
    factor = served_step_factor([trace], profile, engine_config(profile))
    assert factor == pytest.approx(1.1, rel=1e-4)
    # The command writes the profile with the factor measured from the traces given.
    source, served = tmp_path / "profile.json", tmp_path / "served.json"
    source.write_text(json.dumps(profile_to_json(replace(profile, served_step_factor=1.0))))
    argv = ["--profile", str(source), "--write-served", str(served), str(path)]
    assert trace_diff_main(argv) == 0
    assert load_profile(str(served)).served_step_factor == pytest.approx(1.1, rel=1e-4)


def test_a_tokenflow_trace_records_each_steps_decision_mode(tmp_path, monkeypatch) -> None:
    """Slow readers (1 tok/s) of a burst larger than the batch: TokenFlow balances (pauses
    readers with buffer for waiting requests), and each step says which mode decided it with
    the capacity and demand of its last check; fcfs's steps carry no such fields."""
    spec = WorkloadSpec(
        arrival="burst",
        num_requests=40,
        input_len=LengthDist(mean=40, std=0),
        output_len=LengthDist(mean=40, std=0),
        rates="1",
    )
    for policy in ("tokenflow", "fcfs"):
        path = tmp_path / f"{policy}.jsonl"
        monkeypatch.setenv(ENV_VAR, str(path))
        simulate(make_policy(policy), make_requests(spec), CPU)
        trace = load_trace(path)
        if policy == "fcfs":
            assert not any("mode" in s for s in trace)
            continue
        assert {s["mode"] for s in trace} <= {"balance", "fill", "fallback"}
        assert any(s["mode"] == "balance" and s["preempted"] for s in trace)
        checked = [s for s in trace if s["capacity_tok_s"] is not None]
        assert checked and all(s["capacity_tok_s"] > 0 for s in checked)
        # 40 readers at 1 tok/s declare 40 tok/s at most, the batch's 32 rows 32 at least.
        assert all(0 <= s["demand_tok_s"] <= 40 for s in trace)
        assert max(s["demand_tok_s"] for s in trace) >= 32


def test_a_hand_made_trace_is_priced_and_gapped_by_hand() -> None:
    # A decode step of 8 rows at 160 tokens each (the cpu-smollm2 table's context: priced
    # between the batch-1 and batch-8 points, at 8 rows exactly 136.3 ms), measured at
    # 150 ms; 20 ms later a prefill-only step of one 100-token chunk (4 tiles = 128 token
    # slots), measured at 100 ms; then a 2 s wait (not a busy gap) and a decode step again.
    trace = [
        {"start_s": 0.0, "seconds": 0.150, "prefill": [], "decode_rows": 8, "context_tokens": 1280},
        {
            "start_s": 0.170,
            "seconds": 0.100,
            "prefill": [100],
            "decode_rows": 0,
            "context_tokens": 0,
        },
        {
            "start_s": 2.270,
            "seconds": 0.150,
            "prefill": [],
            "decode_rows": 8,
            "context_tokens": 1280,
        },
    ]
    config = engine_config(CPU)
    summary = summarize_trace(trace, CPU, config, busy_gap_s=0.25)
    decode, prefill, mixed = summary.kinds
    assert decode.steps == 2 and decode.priced_s == pytest.approx(2 * 0.1363)
    assert decode.ratio == pytest.approx(0.150 / 0.1363)
    overhead = CPU.overhead_s
    prompt_s = 128 * CPU.flops_per_token / CPU.flops_per_s
    assert prefill.priced_s == pytest.approx(overhead + prompt_s)
    assert mixed.steps == 0
    assert summary.busy_gap_s == pytest.approx(0.020)
    assert summary.span_s == pytest.approx(2.420)


def test_step_noise_is_measured_within_a_size_and_drawn_around_the_price(
    tmp_path, monkeypatch
) -> None:
    """A simulation on a profile with step noise 0.1 leaves a trace whose step to step scatter
    reads back as 0.1. Slowing every prefill step by 30 % (a price off for whole buckets) or
    all steps by a slow drift (up to 50 % by the end) is not scatter and changes nothing, or
    next to nothing. The draws keep the steps' mean cost."""
    spec = burst(16, new_tokens=40)
    noisy_profile = replace(CPU, step_noise_sigma=0.1)
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv(ENV_VAR, str(path))
    noisy = simulate(make_policy("fcfs"), make_requests(spec), noisy_profile, seed=3)
    monkeypatch.delenv(ENV_VAR)
    trace = load_trace(path)
    config = engine_config(CPU)
    assert step_noise_sigma([trace], CPU, config) == pytest.approx(0.1, abs=0.015)
    biased = [{**s, "seconds": s["seconds"] * (1.3 if s["prefill"] else 1.0)} for s in trace]
    assert step_noise_sigma([biased], CPU, config) == pytest.approx(
        step_noise_sigma([trace], CPU, config), rel=1e-9
    )
    drifting = [
        {**s, "seconds": s["seconds"] * (1 + 0.5 * i / len(trace))} for i, s in enumerate(trace)
    ]
    assert step_noise_sigma([drifting], CPU, config) == pytest.approx(0.1, abs=0.015)
    exact = simulate(make_policy("fcfs"), make_requests(spec), CPU)
    assert noisy.stats["num_steps"] == exact.stats["num_steps"]  # fcfs: the same steps
    busy = [
        simulate(make_policy("fcfs"), make_requests(spec), noisy_profile, seed=seed).stats["busy_s"]
        for seed in range(8)
    ]
    assert statistics.fmean(busy) == pytest.approx(exact.stats["busy_s"], rel=0.02)
    assert min(busy) < exact.stats["busy_s"] < max(busy)


def test_a_seed_is_one_draw_of_the_step_noise(tmp_path) -> None:
    """One seed gives one timeline, another seed another; without noise the seed is moot."""
    spec = WorkloadSpec(
        arrival="poisson",
        request_rate=4.0,
        num_requests=12,
        input_len=LengthDist(mean=60, std=20),
        output_len=LengthDist(mean=16, std=0),
        rates="15",
    )

    def ttfts(profile, seed: int) -> list[float]:
        result = simulate(make_policy("tokenflow"), make_requests(spec), profile, seed=seed)
        return [r.reader.gen_times_s[0] - r.arrival_s for r in result.requests]

    noisy_profile = replace(CPU, step_noise_sigma=0.1)
    assert ttfts(noisy_profile, 1) == ttfts(noisy_profile, 1)
    assert ttfts(noisy_profile, 1) != ttfts(noisy_profile, 2)
    assert ttfts(CPU, 1) == ttfts(CPU, 2)
