"""Workloads: deterministic for a seed, trace slices with the rows expected by hand, and the
`vllm bench serve`-named flags choosing the arrival process, lengths and shared prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tfjax.bench import workload as wc
from tfjax.bench.flags import arrival_of, requests_from_args
from tfjax.bench.serve import build_parser
from tfjax.sim.workload import LengthDist


def test_trace_layouts(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
    )
    rows = wc.read_trace(azure)
    assert [(r.input_len, r.output_len) for r in rows] == [(374, 44), (396, 109), (879, 55)]
    reqs = wc.trace_requests(rows, time_scale=0.5, length_scale=0.5, rate_mix="20")
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 2.1572895, 2.2709385])
    assert [(r.prompt_len, r.output_len, r.rate) for r in reqs][1] == (198, 54, 20.0)

    burst = tmp_path / "burstgpt.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,1087,0,1087,Conversation log\n"  # failed request: skipped
        "118,ChatGPT,417,276,693,API log\n"
        "130,ChatGPT,100,20,120,API log\n"
    )
    rows = wc.read_trace(burst)
    assert [r.timestamp_s for r in rows] == [5.0, 118.0, 130.0]
    sliced = wc.trace_requests(rows, start_s=100, duration_s=20, max_input_len=300)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in sliced] == [(0.0, 300, 276)]

    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"timestamp": 1.5, "input_len": 8, "output_len": 4}\n')
    assert wc.read_trace(jsonl)[0] == wc.TraceRow(timestamp_s=1.5, input_len=8, output_len=4)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown columns"):
        wc.read_trace(bad)


def _arrivals(**kw) -> list[tuple]:
    base = dict(
        arrival="gamma",
        num_requests=2000,
        input_len=LengthDist(mean=64, std=16),
        output_len=LengthDist(mean=32),
        request_rate=4.0,
        burstiness=0.25,
        seed=3,
    )
    return [
        (r.arrival_s, r.prompt_len, r.output_len, r.rate)
        for r in wc.synthetic_requests(**(base | kw))
    ]


def test_arrivals_are_seeded_and_follow_vllm_burstiness() -> None:
    assert _arrivals() == _arrivals()
    assert _arrivals() != _arrivals(seed=4)
    assert {a[0] for a in _arrivals(arrival="burst", num_requests=10)} == {0.0}
    times = [a[0] for a in _arrivals()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert mean == pytest.approx(0.25, rel=0.15)
    assert cv == pytest.approx(2.0, rel=0.2)  # gamma shape k = 0.25: cv = 1/sqrt(k)
    req = wc.ClientRequest(index=3, arrival_s=0, prompt_len=16, output_len=4, rate=1.0)
    ids = wc.make_prompt(req, mode="ids", seed=0)
    assert ids == wc.make_prompt(req, mode="ids", seed=0) and len(ids) == 16
    assert len(wc.make_prompt(req, mode="text", seed=0).split()) == 16


def _flags(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_choose_the_arrival_process_as_vllm_does() -> None:
    assert arrival_of(_flags()) == "burst"  # --request-rate inf
    assert arrival_of(_flags("--request-rate", "4")) == "poisson"
    assert arrival_of(_flags("--request-rate", "4", "--burstiness", "0.5")) == "gamma"
    assert arrival_of(_flags("--trace-file", "t.csv")) == "trace"
    burst = requests_from_args(_flags("--num-prompts", "5"))
    assert len(burst) == 5 and {r.arrival_s for r in burst} == {0.0}
    args = ("--num-prompts", "50", "--request-rate", "4", "--seed", "7")
    poisson = requests_from_args(_flags(*args))
    assert poisson == requests_from_args(_flags(*args))  # the same flags, the same requests
    assert poisson != requests_from_args(_flags(*args[:-1], "8"))
    assert poisson[-1].arrival_s == pytest.approx(50 / 4, rel=0.4)


def test_a_shared_prefix_is_the_same_in_every_prompt() -> None:
    args = _flags("--num-prompts", "3", "--random-input-len", "6", "--random-input-len-std", "0")
    plain = requests_from_args(args)
    args.random_prefix_len = 10
    shared = requests_from_args(args)
    assert [r.prompt_len for r in shared] == [16, 16, 16]
    prompts = [wc.make_prompt(r, mode="ids", seed=0) for r in shared]
    assert prompts[0][:10] == prompts[1][:10] == prompts[2][:10]
    assert len({tuple(p[10:]) for p in prompts}) == 3
    # Without a prefix, the prompts are what they were before prefixes existed.
    assert wc.make_prompt(plain[1], mode="ids", seed=0) == prompts[1][10:]
    words = wc.make_prompt(shared[0], mode="text", seed=0).split()
    assert (
        len(words) == 16
        and words[:10] == wc.make_prompt(shared[1], mode="text", seed=0).split()[:10]
    )


def test_trace_flags_keep_every_row_unless_capped(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [f'{{"timestamp": {t}, "input_len": 8, "output_len": 4}}' for t in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    assert len(requests_from_args(_flags("--trace-file", str(trace)))) == 40
    capped = requests_from_args(_flags("--trace-file", str(trace), "--num-prompts", "5"))
    assert [r.arrival_s for r in capped] == [0.0, 1.0, 2.0, 3.0, 4.0]
