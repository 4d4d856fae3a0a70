"""Workloads are deterministic, follow their spec, and replay the Azure trace with scaling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tfjax.sim import LengthDist, WorkloadSpec, load_trace, make_requests
from tfjax.sim.workload import assign_rates, parse_rate_mix

# The Azure LLM inference trace (CC-BY 4.0), where a checkout has the shared data folder beside it.
CONV = Path(__file__).resolve().parents[3] / "shared/data/azure-llm-inference-2023/conv.csv"


def spec(**kw) -> WorkloadSpec:
    base = dict(
        arrival="poisson",
        num_requests=2000,
        input_len=LengthDist(mean=512),
        output_len=LengthDist(mean=1024),
        request_rate=4.0,
        seed=1,
    )
    return WorkloadSpec(**(base | kw))


def summary(reqs):
    return [
        (r.arrival_s, r.num_prompt_tokens, r.sampling.max_tokens, r.consumption_rate) for r in reqs
    ]


def test_seeded() -> None:
    assert summary(make_requests(spec())) == summary(make_requests(spec()))
    assert summary(make_requests(spec())) != summary(make_requests(spec(seed=2)))


def test_arrivals() -> None:
    burst = make_requests(spec(arrival="burst", num_requests=50, start_s=3.0))
    assert {r.arrival_s for r in burst} == {3.0}
    poisson = make_requests(spec())
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(poisson, poisson[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    bursty = make_requests(spec(arrival="gamma", cv=3.0))
    gaps_g = [b.arrival_s - a.arrival_s for a, b in zip(bursty, bursty[1:], strict=False)]
    mean = sum(gaps_g) / len(gaps_g)
    std = (sum((g - mean) ** 2 for g in gaps_g) / len(gaps_g)) ** 0.5
    assert mean == pytest.approx(0.25, rel=0.2) and std / mean > 2.0


def test_lengths_and_rates() -> None:
    reqs = make_requests(spec())
    lens = [r.num_prompt_tokens for r in reqs]
    assert min(lens) >= 1 and max(lens) <= 1024
    assert sum(lens) / len(lens) == pytest.approx(512, rel=0.03)
    rates = [r.consumption_rate for r in reqs]
    assert rates.count(15.0) == 800 and rates.count(20.0) == 1200  # exactly 40/60
    assert parse_rate_mix("20") == [(20.0, 1.0)]
    assert sorted(assign_rates("1:1,2:1,3:1", 4, random.Random(0))) in (
        [1.0, 1.0, 2.0, 3.0],
        [1.0, 2.0, 2.0, 3.0],
        [1.0, 2.0, 3.0, 3.0],
    )
    with pytest.raises(ValueError):
        parse_rate_mix("0:1")
    with pytest.raises(ValueError):
        spec(arrival="uniform")


@pytest.mark.skipif(not CONV.exists(), reason="Azure trace not present")
def test_trace_replay_scaling() -> None:
    plain = load_trace(CONV, limit=50)
    assert plain[0].arrival_s == 0.0
    assert [r.num_prompt_tokens for r in plain[:4]] == [374, 396, 879, 91]
    assert [r.sampling.max_tokens for r in plain[:4]] == [44, 109, 55, 16]
    fast = load_trace(CONV, limit=50, time_scale=0.5, length_scale=0.5, max_input=100)
    assert fast[-1].arrival_s == pytest.approx(plain[-1].arrival_s * 0.5)
    assert max(r.num_prompt_tokens for r in fast) <= 100
    assert fast[1].sampling.max_tokens == round(109 * 0.5)
    skipped = load_trace(CONV, skip=10, limit=5)
    assert skipped[0].arrival_s == 0.0 and len(skipped) == 5


def test_range_ratio_draws_vllm_uniform_lengths() -> None:
    """`--random-range-ratio` 0.25 around 100: every integer of [75, 125], nothing outside."""
    rng = random.Random(0)
    draws = [LengthDist(mean=100, range_ratio=0.25).sample(rng) for _ in range(5000)]
    assert set(draws) == set(range(75, 126))
    assert {LengthDist(mean=7, range_ratio=0.0).sample(rng) for _ in range(20)} == {7}
    with pytest.raises(ValueError, match="not in"):
        LengthDist(mean=100, range_ratio=1.0)
    with pytest.raises(ValueError, match="not both"):
        LengthDist(mean=100, std=3.0, range_ratio=0.1)
