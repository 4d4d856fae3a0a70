"""`tfjax bench engine xla-cpu`: the variants it offers on this jaxlib; how it sums up rounds."""

from __future__ import annotations

from tfjax.bench import engine_xla_cpu as bench


def test_variants_use_only_flags_this_jaxlib_has() -> None:
    names = bench.installed_flag_names()
    assert "xla_cpu_use_xnnpack" in names  # the scan finds XLA's flag table at all
    variants = bench.supported_variants()
    assert variants["baseline"] == ()
    for flags in variants.values():
        assert all(flag.startswith("--xla_cpu_") for flag in flags)
        assert all(flag[2:].split("=")[0] in names for flag in flags)


def _round(step_ms: float, prefill: float) -> dict:
    row = {"decode_step_median_ms": step_ms, "prefill_tokens_per_s": prefill}
    return {"rows": {"1": row, "32": row}, "library_fusions": {"__ynn_fusion": 211}}


def test_medians_skip_failed_rounds() -> None:
    rounds = [_round(30.0, 400.0), {"error": "boom"}, _round(10.0, 500.0), _round(20.0, 450.0)]
    medians = bench._medians(rounds)
    assert medians["1"] == {"decode_step_median_ms": 20.0, "prefill_tokens_per_s": 450.0}
    assert medians["library_fusions"] == {"__ynn_fusion": 211}
    assert bench._medians([{"error": "a"}, {"error": "partition compile failed"}]) == {
        "error": "partition compile failed"
    }
