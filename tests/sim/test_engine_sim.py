"""The simulator is the engine: hand-checked timelines, and the same timeline whatever the
tokens (the fake model, whose tokens prove the page tables right, or the simulator's)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from models.attention import QUERY_TILE
from tests.fakes import FakeRunner, reference_tokens
from tfjax.request import Request, SamplingParams
from tfjax.sched.registry import make_policy
from tfjax.sim import LengthDist, WorkloadSpec, engine_config, get_profile, make_requests, simulate

# A roofline with no memory term: a step costs 10 ms plus 1 ms per decode row or prompt token.
FLAT = replace(
    get_profile("cpu-smollm2"),
    name="flat",
    decode_table_s=(),
    overhead_s=0.010,
    per_row_s=0.0,
    weight_bytes=0.0,
    flops_per_token=1.0,
    flops_per_s=1000.0,
    page_size=4,
    num_device_pages=64,
    num_host_pages=512,
    max_batch_size=8,
    prefill_token_budget=16,
)


def request(rid: str, prompt: list[int], max_tokens: int, arrival_s: float = 0.0) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_s=arrival_s,
        consumption_rate=10.0,
    )


def test_one_request_by_hand() -> None:
    # Prefill 8 tokens, padded to one tile of 32 as the runner pads it: 10 + 32 ms -> first
    # token at 0.042 s; then one decode row per step, 10 + 1 ms each. A second request
    # arriving at 1 s finds the device idle (4 tokens: one tile again).
    assert QUERY_TILE == 32
    a = request("a", [5] * 8, 3)
    b = request("b", [6] * 4, 2, arrival_s=1.0)
    result = simulate(make_policy("fcfs"), [a, b], FLAT)
    assert a.reader.gen_times_s == pytest.approx([0.042, 0.053, 0.064])
    assert b.reader.gen_times_s == pytest.approx([1.042, 1.053])
    assert result.summary["mean_ttft_s"] == pytest.approx(0.042)
    assert result.stats["num_steps"] == 5


BURST = WorkloadSpec(
    arrival="burst",
    num_requests=24,
    input_len=LengthDist(mean=20),
    output_len=LengthDist(mean=40),
    rates="2:0.5,30:0.5",
)


def distinct_prompts(requests: list[Request]) -> list[Request]:
    """The fake model's tokens depend on the prompt: make each request's its own."""
    for i, r in enumerate(requests):
        r.prompt_ids = [3 + (i * 7 + j) % 900 for j in range(len(r.prompt_ids))]
    return requests


@pytest.mark.parametrize("policy", ["fcfs", "andes", "tokenflow"])
def test_fake_model_and_simulator_tokens_give_one_timeline(policy: str) -> None:
    """The KV pool (64 pages of 4) is far smaller than the burst: requests are preempted,
    swapped to the host and loaded back. With the fake model every token is checked against
    its reference, so the page tables and the host copies were right; with the simulator's
    constant tokens the engine does exactly the same steps."""
    config = engine_config(FLAT)
    fake = FakeRunner(num_pages=config.num_pages, page_size=FLAT.page_size)
    real = distinct_prompts(make_requests(BURST))
    sim = distinct_prompts(make_requests(BURST))
    with_fake = simulate(
        make_policy(policy), real, FLAT, config, tokens=fake, page_store=fake, check_every=1
    )
    simulated = simulate(make_policy(policy), sim, FLAT, config)
    for r in real:
        assert r.output_ids == reference_tokens(r.prompt_ids, r.sampling.max_tokens)
    assert [r.reader.gen_times_s for r in real] == [r.reader.gen_times_s for r in sim]
    assert with_fake.summary == simulated.summary
    assert simulated.stats["num_preemptions"] > 0
    if policy == "tokenflow":
        assert simulated.stats["num_loads"] > 0


def test_host_copies_on_the_steps_cores_delay_the_steps_by_their_time() -> None:
    # FLAT's page: 4 tokens of 46,080 B = 184,320 B; at 1.8432 GB/s a page copies in 0.1 ms.
    # Write-through may take 2 % of the 11 ms decode step where copies share its cores: 0.22 ms,
    # 2 pages a step. The request (8 prompt tokens, 9 new) copies pages 0-1 after its first
    # decode step (9 tokens computed) and page 2 after its fourth (12); its last step finishes
    # it, so nothing more: 3 pages, 0.3 ms later than where copies cost the step nothing.
    page_copy_s = 1e-4
    fast = replace(FLAT, d2h_bytes_per_s=4 * FLAT.kv_bytes_per_token / page_copy_s)
    ends = {}
    for shares in (False, True):
        profile = replace(fast, host_copies_share_compute=shares)
        a = request("a", [5] * 8, 9)
        result = simulate(make_policy("tokenflow"), [a], profile)
        assert result.stats["num_copied_pages"] == 3
        assert result.stats["copy_s"] == pytest.approx(3 * page_copy_s)
        ends[shares] = a.reader.gen_times_s[-1]
    assert ends[False] == pytest.approx(0.042 + 8 * 0.011)
    assert ends[True] - ends[False] == pytest.approx(3 * page_copy_s)
    # FCFS never copies (it never loads): the same end either way.
    b = request("b", [5] * 8, 9)
    simulate(make_policy("fcfs"), [b], replace(fast, host_copies_share_compute=True))
    assert b.reader.gen_times_s[-1] == pytest.approx(ends[False])


def test_planning_delays_each_step_by_its_cost_per_live_request() -> None:
    # test_one_request_by_hand's first request, with 1 ms of planning per live request: each of
    # its three steps (prefill, two decodes) waits 1 ms for its plan.
    a = request("a", [5] * 8, 3)
    simulate(make_policy("fcfs"), [a], replace(FLAT, plan_s_per_request=1e-3))
    assert a.reader.gen_times_s == pytest.approx([0.043, 0.055, 0.067])
