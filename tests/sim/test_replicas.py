"""Several simulated replicas behind a router: exact against single-replica runs by hand."""

from __future__ import annotations

import pytest

from tfjax.sched.registry import make_policy
from tfjax.sim import LengthDist, WorkloadSpec, get_profile, make_requests, simulate

CPU = get_profile("cpu-smollm2")


def burst(num_requests: int) -> WorkloadSpec:
    return WorkloadSpec(
        arrival="burst",
        num_requests=num_requests,
        input_len=LengthDist(mean=40, std=0),
        output_len=LengthDist(mean=24, std=0),
        rates="15",
    )


def ttfts(result) -> list[float]:
    return sorted(round(r.reader.gen_times_s[0] - r.arrival_s, 9) for r in result.requests)


@pytest.mark.parametrize("policy", ["fcfs", "tokenflow"])
def test_round_robin_over_two_replicas_is_two_half_bursts(policy: str) -> None:
    # 16 equal requests at once, dealt alternately: each replica serves the 8-request burst
    # that one engine alone serves, so the TTFTs are those of the half burst, each twice.
    two = simulate(make_policy(policy), make_requests(burst(16)), CPU, replicas=2)
    half = simulate(make_policy(policy), make_requests(burst(8)), CPU)
    assert ttfts(two) == sorted(ttfts(half) * 2)
    assert two.stats["num_steps"] == 2 * half.stats["num_steps"]
    assert [s["num_steps"] for s in two.stats["replicas"]] == [half.stats["num_steps"]] * 2


def test_more_replicas_never_raise_the_burst_ttft() -> None:
    means = [
        simulate(make_policy("tokenflow"), make_requests(burst(64)), CPU, replicas=n).summary[
            "mean_ttft_s"
        ]
        for n in (1, 2, 4)
    ]
    assert means[0] > means[1] > means[2]


def test_power_of_two_sends_a_request_to_the_less_loaded_of_two() -> None:
    # Two replicas: the pair drawn is always both, so a request never joins the replica with
    # more live requests; a burst of 10 ends up 5 and 5, as round robin deals it.
    result = simulate(
        make_policy("fcfs"), make_requests(burst(10)), CPU, replicas=2, route="power_of_two"
    )
    rr = simulate(make_policy("fcfs"), make_requests(burst(10)), CPU, replicas=2)
    assert ttfts(result) == ttfts(rr)


def test_an_unknown_route_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown route"):
        simulate(make_policy("fcfs"), make_requests(burst(2)), CPU, route="random")
