"""Workload and profile files: round trips, clear errors, and `tfjax simulate` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.cli import main
from tfjax.sim import PROFILES
from tfjax.sim.profiles import load_profile, profile_from_json, profile_to_json
from tfjax.sim.workload import load_workload_file


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_round_trip_through_json(name: str, tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_to_json(PROFILES[name])))
    assert load_profile(str(path)) == PROFILES[name]
    assert load_profile(name) is PROFILES[name]


def test_a_profile_file_with_an_unknown_field_is_rejected() -> None:
    data = profile_to_json(PROFILES["cpu-smollm2"]) | {"warp_speed": 9}
    with pytest.raises(ValueError, match="warp_speed"):
        profile_from_json(data)


GOOD = {"arrival_s": 0.5, "prompt_token_ids": [7, 8, 9], "max_tokens": 4, "consumption_rate": 5}


def write(tmp_path: Path, *entries: dict) -> Path:
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"requests": list(entries)}))
    return path


def test_workload_file_requests(tmp_path: Path) -> None:
    lengths = {"arrival_s": 0, "prompt_tokens": 5, "max_tokens": 2, "consumption_rate": 1.5}
    a, b, c = load_workload_file(write(tmp_path, GOOD, lengths, lengths))
    assert (a.prompt_ids, a.sampling.max_tokens, a.arrival_s, a.consumption_rate) == (
        [7, 8, 9],
        4,
        0.5,
        5.0,
    )
    assert a.sampling.ignore_eos
    assert len(b.prompt_ids) == 5 and b.prompt_ids[0] != c.prompt_ids[0]  # no shared prefix


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_tokens": 0}, r"requests\[1\]\.max_tokens"),
        ({"max_tokens": "4"}, r"requests\[1\]\.max_tokens"),
        ({"arrival_s": -1}, r"requests\[1\]\.arrival_s"),
        ({"consumption_rate": None}, r"requests\[1\]\.consumption_rate"),
        ({"prompt_token_ids": []}, r"requests\[1\]\.prompt_token_ids"),
        ({"prompt_token_ids": [1, "a"]}, r"requests\[1\]\.prompt_token_ids"),
        ({"speed": 3}, r"requests\[1\]\.speed: unknown field"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_workload_file(write(tmp_path, GOOD, GOOD | change))


def test_missing_prompt_is_named(tmp_path: Path) -> None:
    entry = {k: v for k, v in GOOD.items() if k != "prompt_token_ids"}
    with pytest.raises(ValueError, match=r"requests\[0\]\.prompt_tokens"):
        load_workload_file(write(tmp_path, entry))


def test_simulate_command(tmp_path: Path, capsys) -> None:
    workload = write(tmp_path, GOOD, GOOD | {"arrival_s": 0.0})
    out = tmp_path / "r.json"
    argv = ["simulate", "--profile", "cpu-smollm2", "--workload", str(workload)]
    assert main([*argv, "--policy", "fcfs", "--max-batch-size", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {
        "mean_ttft_s",
        "p50_ttft_s",
        "p99_ttft_s",
        "raw_throughput",
        "effective_throughput",
        "stall_ratio",
        "preemptions",
    }
    first, second = result["requests"]  # in file order
    assert first["arrival_s"] == 0.5 and len(first["token_times_s"]) == 4
    # One row at a time: the request that arrived first is served to the end first.
    assert second["token_times_s"][-1] < first["token_times_s"][0]
    bad = write(tmp_path, GOOD | {"max_tokens": -2})
    assert main([*argv[:-1], str(bad), "--out", str(out)]) == 2
    assert "requests[0].max_tokens" in capsys.readouterr().err
