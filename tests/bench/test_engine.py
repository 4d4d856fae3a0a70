"""`tfjax bench engine` end to end on a tiny checkpoint: our runner built through
`tfjax.runner_setup`, HF transformers on the same shapes, and every row beside its floors."""

from __future__ import annotations

import gzip
import json
import types
from pathlib import Path

import pytest

from serving.cli import main as tfjax
from tfjax.bench import engine, trace_kernels
from tfjax.bench.floors import Floors, flops_per_token
from tfjax.runner_setup import make_runner


@pytest.mark.slow  # the floors time a 256 MB read and 4096-square matmuls: ~20 s on 2 cores
def test_engine_rows_have_ours_hf_and_floors(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    argv = ["bench", "engine", "--model", str(tiny_llama3_dir), "--batches", "1,2"]
    argv += ["--contexts", "16", "--new-tokens", "4", "--out", str(tmp_path)]
    argv += ["--profile", str(tmp_path / "trace")]
    assert tfjax(argv) == 0
    # The profiled second pass runs compiled steps only: no compile in its trace.
    with gzip.open(trace_kernels.newest_trace(tmp_path / "trace")) as file:
        host = trace_kernels.kernel_times(json.load(file), "/host")
    names = {name for counter in host.values() for name in counter}
    assert any("step" in name for name in names)
    assert not any("compile_step" in name for name in names)
    result = json.loads((tmp_path / "bench_engine.json").read_text())
    assert [(r["batch"], r["context"]) for r in result["rows"]] == [(1, 16), (2, 16)]
    for row in result["rows"]:
        assert row["ours"]["decode_tokens_per_s"] > 0 and row["ours"]["prefill_tokens_per_s"] > 0
        assert row["hf"]["decode_tokens_per_s"] > 0 and row["hf"]["generate_tokens_per_s"] > 0
        assert row["floor"]["decode_step_ms"] >= row["floor"]["decode_read_ms"] > 0


def test_floors_by_hand(tiny_llama3_dir: Path) -> None:
    from models import load_model

    cfg = load_model(str(tiny_llama3_dir), dtype="float32").config
    d, f, h, k, dh = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    per_layer = 2 * (2 * d * h * dh + 2 * d * k * dh + 3 * d * f) + 4 * h * dh * 10
    assert flops_per_token(cfg, 10) == cfg.num_layers * per_layer + 2 * d * cfg.vocab_size
    floors = Floors(bandwidth=1e9, flops=1e12, weight_bytes=1_000_000)
    kv_bytes = 2 * cfg.num_layers * k * dh * 4  # float32 K and V of one token
    assert floors.decode_read_s(cfg, 2, 10) == pytest.approx((1e6 + 2 * 10 * kv_bytes) / 1e9)


def test_make_runner_caps_the_context_by_the_pool(tiny_llama3_dir: Path) -> None:
    from models import load_model
    from tfjax.config import EngineConfig

    model = load_model(str(tiny_llama3_dir), dtype="float32")
    config = EngineConfig(max_batch_size=2, prefill_token_budget=64)
    runner = make_runner(model.config, model.weights, config, num_pages=5, max_model_len=4096)
    assert runner.max_model_len == 4 * config.page_size  # page 0 is padding: 4 pages hold it
    wide = make_runner(model.config, model.weights, config, num_pages=1000, max_model_len=100)
    assert wide.max_model_len == 100


class _PacedGenerate:
    """A stand-in for an HF model on a fake clock: `generate` takes 10 ms per new token, and
    its first call of all 200 ms more (torch's one-time costs)."""

    def __init__(self) -> None:
        self.config = types.SimpleNamespace(vocab_size=100)
        self.calls: list[int] = []
        self.now = 0.0

    def generate(self, ids, *, max_new_tokens: int, **_) -> None:
        self.now += 0.01 * max_new_tokens + (0.2 if not self.calls else 0.0)
        self.calls.append(max_new_tokens)


def test_bench_hf_times_warm_calls_and_the_whole_generate(monkeypatch) -> None:
    model = _PacedGenerate()
    monkeypatch.setattr(engine.time, "perf_counter", lambda: model.now)
    hf = engine.bench_hf(model, batch=4, prompt_len=8, new_tokens=10, seed=0)
    assert model.calls == [2, 1, 10]  # the untimed first call, then prefill, then the whole run
    assert hf["prefill_tokens_per_s"] == pytest.approx(4 * 8 / 0.01)  # not over 0.21 s
    assert hf["decode_tokens_per_s"] == pytest.approx(4 * 9 / 0.09)
    assert hf["generate_tokens_per_s"] == pytest.approx(4 * 10 / 0.1)
