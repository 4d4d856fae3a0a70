"""`tfjax bench sim-vs-live` without a server (`--live-from`): the simulator's side as a
median over seeds, compared with the median of the live replays on file."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

from tfjax.bench.sim_vs_live import METRICS, main, write_workloads
from tfjax.sim import get_profile
from tfjax.sim.profiles import profile_to_json


def test_sim_seeds_are_draws_of_a_noisy_profile_compared_by_median(tmp_path, capsys) -> None:
    write_workloads(tmp_path)
    workload = tmp_path / "long_poisson.json"
    profile = tmp_path / "noisy.json"
    noisy = replace(get_profile("cpu-smollm2"), step_noise_sigma=0.1)
    profile.write_text(json.dumps(profile_to_json(noisy)))
    replays = [{key: value * scale for key, value in zip(METRICS, (1.0, 2.0, 30.0), strict=True)}
               for scale in (0.9, 1.0, 1.3)]  # fmt: skip
    live = tmp_path / "live.json"
    live.write_text(json.dumps({"live": replays[1], "live_replays": replays}))
    out = tmp_path / "result.json"
    argv = ["--workload", str(workload), "--policy", "fcfs", "--profile", str(profile),
            "--server-args=--kv-pages 96", "--live-from", str(live), "--sim-seeds", "3",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(out.read_text())
    assert len(row["sim_runs"]) == 3
    assert len({run["mean_ttft_s"] for run in row["sim_runs"]}) == 3  # three draws
    for key in METRICS:
        assert row["sim"][key] == statistics.median(run[key] for run in row["sim_runs"])
        assert row["live"][key] == replays[1][key]
    printed = capsys.readouterr().out
    assert "min-max of 3), sim median (min-max of 3)" in printed
    ratio = row["sim"]["mean_ttft_s"] / replays[1]["mean_ttft_s"]
    assert f"{ratio:6.2f}x" in printed.splitlines()[-3]
