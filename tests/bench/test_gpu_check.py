"""scripts/gpu_check.sh / `tfjax bench gpu-check`: the targets gate the exit code, and the
whole check runs on CPU (`--dry-run`) so it cannot fail for a trivial reason on its first GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from models.weights import init_random
from tests.parallel.tp_checks import LLAMA, engine_tokens, tie_gaps
from tfjax.bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def _bench_result(step_ms: dict[int, float], prefill_rate: float) -> dict:
    rows = [
        {
            "batch": batch,
            "context": 512,
            "ours": {"decode_step_median_ms": step, "prefill_tokens_per_s": prefill_rate},
            "floor": {"decode_read_ms": 10.0, "prefill_tokens_per_s": 1000.0},
        }
        for batch, step in step_ms.items()
    ]
    return {"device_kind": "fake", "read_bandwidth_bytes_per_s": 1e12, "rows": rows}


@pytest.mark.parametrize(
    "step_ms,dry_run,passed",
    [
        ({1: 12.9, 32: 99.0, 128: 15.0}, False, True),  # batch 32 carries no target
        ({1: 13.1, 128: 15.0}, False, False),  # 1.31x the floor at batch 1
        ({1: 12.0, 128: 15.1}, False, False),  # 1.51x at batch 128
        ({1: 50.0, 128: 50.0}, True, True),  # a dry run records, never judges
    ],
)
def test_decode_targets_gate(monkeypatch, tmp_path, step_ms, dry_run, passed) -> None:
    monkeypatch.setattr(gpu_check, "bench", lambda *a, **k: _bench_result(step_ms, 0.0))
    record = gpu_check.check_decode(tmp_path, gpu_check.FULL, dry_run)
    assert record["passed"] is passed
    by_batch = {row["batch"]: row for row in record["rows"]}
    assert by_batch[1]["x_floor"] == pytest.approx(step_ms[1] / 10.0)
    assert by_batch[1]["met"] is (None if dry_run else step_ms[1] <= 13.0)


@pytest.mark.parametrize("rate,passed", [(500.0, True), (499.0, False)])
def test_prefill_target_gates(monkeypatch, tmp_path, rate, passed) -> None:
    monkeypatch.setattr(gpu_check, "bench", lambda *a, **k: _bench_result({16: 1.0}, rate))
    assert gpu_check.check_prefill(tmp_path, gpu_check.FULL, False)["passed"] is passed


def test_a_failed_benchmark_fails_its_check(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(gpu_check, "bench", lambda *a, **k: {})
    assert not gpu_check.check_decode(tmp_path, gpu_check.FULL, False)["passed"]
    assert not gpu_check.check_prefill(tmp_path, gpu_check.FULL, False)["passed"]


def test_tie_gaps_tell_a_near_tie_from_a_wrong_token() -> None:
    """The engine check forgives a greedy flip only where the reference's logits nearly tie."""
    cfg = dataclasses.replace(LLAMA, head_dim=16)
    host = jax.device_get(init_random(cfg, jax.random.key(1), scale=0.3))
    reference = engine_tokens(cfg, host, 1, attention_backend="reference")
    assert tie_gaps(cfg, host, reference, reference) == {}
    row = reference["r3"]
    wrong = dict(reference, r3=row[:5] + [(row[5] + 1) % cfg.vocab_size] + row[6:])
    gaps = tie_gaps(cfg, host, wrong, reference)
    assert list(gaps) == ["r3"] and gaps["r3"] > gpu_check.TIE_LOGIT_GAP
    assert tie_gaps(cfg, host, dict(reference, r3=row[:4]), reference) == {"r3": float("inf")}


def test_only_runs_the_named_sections(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(
        gpu_check, "check_attention", lambda *a: {"check": "attention", "passed": True}
    )
    monkeypatch.setattr(gpu_check, "check_engine", lambda *a: {"check": "engine", "passed": False})
    assert gpu_check.main(["--out", str(tmp_path), "--only", "attention"]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["sections"] == ["attention"] and summary["passed"]
    assert gpu_check.main(["--out", str(tmp_path), "--only", "attention,engine"]) == 1
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--only", "kernels"])


def test_unknown_argument_exits_2() -> None:
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown argument" in result.stderr


def test_dry_run_passes_on_cpu(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result.returncode == 0, json.dumps(summary, indent=2) + result.stderr[-3000:]
    assert summary["dry_run"] and summary["passed"] and summary["complete"]
    assert [c["check"] for c in summary["checks"]] == [
        "attention",
        "engine",
        "decode",
        "prefill",
        "burst",
        "quantized",
    ]
    engine = summary["checks"][1]
    assert engine["num_tokens"] > 0 and engine["differing_requests"] == []
    burst = summary["checks"][4]
    assert burst["complete_streams"] == burst["streams"] > 0 and burst["invariants"] == "ok"
