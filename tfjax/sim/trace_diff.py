"""Where a cost profile and a server part ways, read from the server's own step trace.

    TFJAX_STEP_TRACE=live.jsonl tfjax serve ...      # then replay a workload against it
    python -m tfjax.sim.trace_diff --profile cpu.json live.jsonl [sim.jsonl ...]

For every traced step (`tfjax.step_trace`) it prices the same sizes as the simulator does
(`tfjax.sim.costed.step_price`) and reports, per kind of step (decode-only, prefill-only,
mixed), the measured and priced seconds and their ratio: a ratio away from 1 is a profile
error, whatever the policy did. It also reports the engine's time between steps while it is
busy (gaps under `--busy-gap-s`; longer ones wait for arrivals or copies): planning,
bookkeeping and streaming, of which the simulator charges planning only. A simulated trace of
the same workload, given too, shows whether the two runs took the same steps.

    python -m tfjax.sim.trace_diff --profile cpu.json live.jsonl --write-served served.json

writes the profile with its `served_step_factor` measured from the live traces given: all their
steps' measured seconds over what the runner alone would take (the profile's price with the
factor at 1), and its `step_noise_sigma`: how far a step's cost scatters from the step
before it of the same size. Trace a calibration workload for it, not one the simulator is then
judged on.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tfjax.config import EngineConfig
from tfjax.sim.costed import step_price
from tfjax.sim.profiles import CostProfile, load_profile, profile_to_json

STEP_KINDS = ("decode", "prefill", "mixed")
BUSY_GAP_S = 0.25  # steps further apart waited for arrivals or copies in between


def load_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def traced_step_price(step: dict, profile: CostProfile, config: EngineConfig) -> float:
    """`step_price` of a traced step. Traces written before each chunk's context was recorded
    price every chunk as a prompt's first; before each decode row's, rows hold even shares
    of the step's context."""
    before = step.get("prefill_context") or [0] * len(step["prefill"])
    chunks = list(zip(before, step["prefill"], strict=True))
    return step_price(profile, config, chunks, decode_contexts(step))


def decode_contexts(step: dict) -> list[int]:
    """Each decode row's context tokens in a traced step (even shares in older traces)."""
    if "decode_contexts" in step:
        return step["decode_contexts"]
    rows, total = step["decode_rows"], step["context_tokens"]
    return [total // rows + (i < total % rows) for i in range(rows)]


def step_kind(step: dict) -> str:
    if not step["prefill"]:
        return "decode"
    return "mixed" if step["decode_rows"] else "prefill"


@dataclass(frozen=True, slots=True)
class KindSummary:
    kind: str
    steps: int
    measured_s: float
    priced_s: float
    median_ratio: float  # of measured / priced, per step

    @property
    def ratio(self) -> float:
        return self.measured_s / self.priced_s if self.priced_s else float("nan")


@dataclass(frozen=True, slots=True)
class TraceSummary:
    steps: int
    span_s: float
    kinds: tuple[KindSummary, ...]
    busy_gap_s: float  # between steps, gaps under the threshold only
    median_gap_ms: float


def summarize_trace(
    trace: Sequence[dict],
    profile: CostProfile,
    config: EngineConfig,
    busy_gap_s: float = BUSY_GAP_S,
) -> TraceSummary:
    kinds = []
    for kind in STEP_KINDS:
        steps = [s for s in trace if step_kind(s) == kind]
        prices = [traced_step_price(s, profile, config) for s in steps]
        ratios = [s["seconds"] / p for s, p in zip(steps, prices, strict=True) if p > 0]
        kinds.append(
            KindSummary(
                kind=kind,
                steps=len(steps),
                measured_s=sum(s["seconds"] for s in steps),
                priced_s=sum(prices),
                median_ratio=statistics.median(ratios) if ratios else float("nan"),
            )
        )
    gaps = [
        b["start_s"] - (a["start_s"] + a["seconds"]) for a, b in zip(trace, trace[1:], strict=False)
    ]
    busy = [g for g in gaps if g < busy_gap_s]
    return TraceSummary(
        steps=len(trace),
        span_s=trace[-1]["start_s"] + trace[-1]["seconds"] - trace[0]["start_s"] if trace else 0.0,
        kinds=tuple(kinds),
        busy_gap_s=sum(busy),
        median_gap_ms=1e3 * statistics.median(busy) if busy else 0.0,
    )


def served_step_factor(
    traces: Sequence[Sequence[dict]], profile: CostProfile, config: EngineConfig
) -> float:
    """Seconds the traced steps took over their price on `profile` as the runner alone."""
    runner_only = replace(profile, served_step_factor=1.0)
    steps = [s for trace in traces for s in trace]
    priced = sum(traced_step_price(s, runner_only, config) for s in steps)
    if not priced:
        raise ValueError("the traces hold no step to measure")
    return sum(s["seconds"] for s in steps) / priced


@dataclass(frozen=True)
class _PricedStep:
    """A traced step's size (kind and bucket), span, and log(measured / price)."""

    size: tuple
    start_s: float
    end_s: float
    log_ratio: float

    @classmethod
    def of(cls, step: dict, profile: CostProfile, config: EngineConfig) -> _PricedStep:
        return cls(
            size=(step_kind(step), config.bucket_for(step["prefill"], step["decode_rows"])),
            start_s=step["start_s"],
            end_s=step["start_s"] + step["seconds"],
            log_ratio=math.log(step["seconds"] / traced_step_price(step, profile, config)),
        )


def step_noise_sigma(
    traces: Sequence[Sequence[dict]], profile: CostProfile, config: EngineConfig
) -> float:
    """How much a step's cost scatters from the one before it: from each pair of back-to-back
    steps of one kind and bucket, the difference d of their log(measured / price), and
    sqrt(mean(d^2) / 2) (von Neumann's estimator of an independent noise's deviation).

    Step to step scatter is what decides which step an arrival lands in. Differences leave out
    what drifts slowly (a replay whose steps all run a few % slow, a price that is off for a
    whole bucket or context range): a spread around each size's mean counts those too (0.10
    on this VM's calibration traces against 0.045-0.05 so), and drawn independently every
    step they would scatter the simulated step times twice as far as the server's do."""

    diffs = []
    for trace in traces:
        priced = [_PricedStep.of(step, profile, config) for step in trace]  # each priced once
        diffs += [
            b.log_ratio - a.log_ratio
            for a, b in zip(priced, priced[1:], strict=False)
            if b.start_s - a.end_s < BUSY_GAP_S and a.size == b.size
        ]
    if not diffs:
        raise ValueError("the traces hold no two back-to-back steps of one size")
    return math.sqrt(statistics.fmean(d * d for d in diffs) / 2)


def format_summary(name: str, summary: TraceSummary) -> str:
    lines = [
        f"{name}: {summary.steps} steps over {summary.span_s:.1f} s; between busy steps "
        f"{summary.busy_gap_s:.2f} s in all, median {summary.median_gap_ms:.1f} ms",
        "  kind      steps  measured_s  priced_s  ratio  median_step_ratio",
    ]
    for k in summary.kinds:
        lines.append(
            f"  {k.kind:8} {k.steps:6} {k.measured_s:11.2f} {k.priced_s:9.2f} "
            f"{k.ratio:6.2f} {k.median_ratio:18.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tfjax.sim.driver import engine_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="built-in profile or calibrate file")
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--prefill-token-budget", type=int, default=None)
    parser.add_argument("--busy-gap-s", type=float, default=BUSY_GAP_S)
    parser.add_argument(
        "--write-served",
        type=Path,
        default=None,
        metavar="PROFILE",
        help="write the profile with served_step_factor and step_noise_sigma measured from"
        " these live traces",
    )
    parser.add_argument("traces", type=Path, nargs="+", help="TFJAX_STEP_TRACE files")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    overrides = {
        k: v
        for k, v in (
            ("max_batch_size", args.max_batch_size),
            ("prefill_token_budget", args.prefill_token_budget),
        )
        if v is not None
    }
    config = engine_config(profile, **overrides)
    traces = [load_trace(path) for path in args.traces]
    for path, trace in zip(args.traces, traces, strict=True):
        print(format_summary(str(path), summarize_trace(trace, profile, config, args.busy_gap_s)))
    if args.write_served:
        factor = served_step_factor(traces, profile, config)
        sigma = step_noise_sigma(traces, profile, config)
        served = replace(
            profile,
            served_step_factor=factor,
            step_noise_sigma=sigma,
            source=f"{profile.source}\nsteps as served: {factor:.3f}x the runner's, log-scatter"
            f" {sigma:.3f} step to step ({', '.join(p.name for p in args.traces)})",
        )
        args.write_served.write_text(json.dumps(profile_to_json(served), indent=1))
        print(f"served_step_factor {factor:.3f}, step_noise_sigma {sigma:.3f}:"
              f" wrote {args.write_served}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
