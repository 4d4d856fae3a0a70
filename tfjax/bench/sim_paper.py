"""`tfjax bench sim`: the simulated experiments of the TokenFlow paper (§7) for all four policies.

Setups (paper Table 1; rates 15/20 tok/s mixed 40/60 unless the name says otherwise):
  4090-a..d   rtx4090-llama3-8b: burst 60 SL, burst 80 LL, Poisson 2/s and 4/s SL (60 s)
  h200-a..d   h200-llama3-8b (KV as mem-frac 0.3): burst 400 SL, burst 200 LL,
              Poisson 5/s and 10/s SL (30 s)
  4090-a@20/25/30   the speed sweep (paper Fig. 20): 4090-a with every reader at one rate
  h200-azure  Azure conv trace replay (see AZURE_CONV below for the window)
SL = 512 input / 2048 output tokens, LL = 1024 / 2048 (the notes' reading of Table 1); H200
outputs are doubled as in the paper. Lengths are normal with std = mean / 4.

Setups come in three groups, reported in separate tables:
- `tuning`: the setups above. The policy's open parameters (`TokenFlowConfig`) were chosen
  on the H200 burst 400 (h200-a) and checked on the others; their numbers are not evidence
  of how the policy does on workloads it has not seen.
- `issue-13`: the live finding on this CPU (cpu-overload: 32 streams of 64 tokens, ~17-token
  prompts, the default 15 tok/s, on the bench_engine-calibrated `cpu-smollm2` profile), used
  to design the overload fix.
- `held-out`: workloads defined before any of them was run and not used to choose anything
  (no parameter was changed after their first run): the Azure code trace (code.csv, same
  recipe as the conv replay), bursts of other sizes and rate mixes on both GPUs, and CPU
  bursts: more undeclared streams than the batch cap, slow declared readers with
  undeclared ones, non-streaming requests, and slow readers on a KV pool smaller than the
  burst.

Prints a table per group with ratios against fcfs, writes DIR/summary.json (one row per setup
and policy) and PNG plots: TTFT CDFs per setup and token timelines (paper Fig. 18). For
non-streaming setups the latency column (arrival to last token) is the one that matters.

    tfjax bench sim --out out/sim [--group held-out] [--policies ...]
    tfjax bench sim sched [--calls 40]    # plan() overhead per policy (tfjax.bench.sim_sched)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tfjax.bench.flags import HelpFormatter
from tfjax.request import Request
from tfjax.sched.registry import POLICY_NAMES, make_policy
from tfjax.sim import LengthDist, WorkloadSpec, get_profile, load_trace, make_requests, simulate

# The Azure LLM inference 2023 trace (CC-BY 4.0): TFJAX_AZURE_TRACE_DIR, else the shared data
# folder beside the checkout.
AZURE_DIR = Path(
    os.environ.get(
        "TFJAX_AZURE_TRACE_DIR",
        Path(__file__).resolve().parents[3] / "shared/data/azure-llm-inference-2023",
    )
)


@dataclass(frozen=True)
class Trace:
    """An Azure trace window: 1000 requests, arrival gaps * 0.4 (2.5x the production load)."""

    file: str
    skip: int  # where the window starts
    limit: int = 1000
    time_scale: float = 0.4
    max_input: int = 4096


AZURE_CONV = Trace("conv.csv", skip=9000)  # the busiest half hour (minutes ~27-33)
AZURE_CODE = Trace("code.csv", skip=2000)  # its busiest 1000 requests (236 s)
MIX = "15:0.4,20:0.6"
UNDECLARED = "15"  # what `tfjax serve` gives a stream without consumption_rate
TIMELINE_SETUPS = ("4090-a", "h200-b")
GROUPS = ("tuning", "issue-13", "held-out")


@dataclass(frozen=True)
class Setup:
    name: str
    profile: str
    spec: WorkloadSpec | Trace
    note: str
    group: str = "tuning"
    num_device_pages: int | None = None  # None: the profile's KV pool


def _spec(
    arrival: str,
    n: int,
    inp: int,
    out: int,
    rate: float = 1.0,
    mix: str = MIX,
    *,
    streaming: bool = True,
    exact: bool = False,
) -> WorkloadSpec:
    """Lengths normal with std = mean / 4, or `exact` (the live CPU runs' ignore_eos outputs
    and ~17 +- 2-token prompts)."""
    return WorkloadSpec(
        arrival=arrival,
        num_requests=n,
        input_len=LengthDist(mean=inp, std=2 if exact else None),
        output_len=LengthDist(mean=out, std=0 if exact else None),
        request_rate=rate,
        rates=mix,
        streaming=streaming,
    )


CPU = "cpu-smollm2"


SETUPS = [
    Setup("4090-a", "rtx4090-llama3-8b", _spec("burst", 60, 512, 2048), "burst 60 SL"),
    Setup("4090-b", "rtx4090-llama3-8b", _spec("burst", 80, 1024, 2048), "burst 80 LL"),
    Setup("4090-c", "rtx4090-llama3-8b", _spec("poisson", 120, 512, 2048, 2.0), "Poisson 2/s SL"),
    Setup("4090-d", "rtx4090-llama3-8b", _spec("poisson", 240, 512, 2048, 4.0), "Poisson 4/s SL"),
    Setup("h200-a", "h200-llama3-8b", _spec("burst", 400, 512, 4096), "burst 400 SL"),
    Setup("h200-b", "h200-llama3-8b", _spec("burst", 200, 1024, 4096), "burst 200 LL"),
    Setup("h200-c", "h200-llama3-8b", _spec("poisson", 150, 512, 4096, 5.0), "Poisson 5/s SL"),
    Setup("h200-d", "h200-llama3-8b", _spec("poisson", 300, 512, 4096, 10.0), "Poisson 10/s SL"),
    *(
        Setup(
            f"4090-a@{r}",
            "rtx4090-llama3-8b",
            _spec("burst", 60, 512, 2048, mix=str(r)),
            f"burst 60 SL, all at {r} tok/s",
        )
        for r in (20, 25, 30)
    ),
    Setup("h200-azure", "h200-llama3-8b", AZURE_CONV, "Azure conv replay"),
    Setup(
        "cpu-overload",
        CPU,
        _spec("burst", 32, 17, 64, mix=UNDECLARED, exact=True),
        "the live burst: 32 undeclared streams",
        "issue-13",
    ),
    Setup("h200-code", "h200-llama3-8b", AZURE_CODE, "Azure code replay", "held-out"),
    Setup(
        "h200-e",
        "h200-llama3-8b",
        _spec("burst", 100, 512, 4096, mix="10:0.5,30:0.5"),
        "burst 100 SL at 10/30 tok/s",
        "held-out",
    ),
    Setup(
        "h200-f",
        "h200-llama3-8b",
        _spec("burst", 300, 1024, 2048, mix="5:0.3,15:0.4,40:0.3"),
        "burst 300 LL/2 at 5/15/40 tok/s",
        "held-out",
    ),
    Setup(
        "4090-e",
        "rtx4090-llama3-8b",
        _spec("burst", 40, 512, 2048, mix="8:0.5,12:0.5"),
        "burst 40 SL at 8/12 tok/s",
        "held-out",
    ),
    Setup(
        "4090-f",
        "rtx4090-llama3-8b",
        _spec("burst", 120, 1024, 2048),
        "burst 120 LL",
        "held-out",
    ),
    Setup(
        "4090-g",
        "rtx4090-llama3-8b",
        _spec("poisson", 180, 512, 2048, 3.0, mix=UNDECLARED),
        "Poisson 3/s SL, undeclared",
        "held-out",
    ),
    Setup(
        "cpu-undeclared-64",
        CPU,
        _spec("burst", 64, 17, 64, mix=UNDECLARED, exact=True),
        "burst 64 undeclared streams (2x the batch cap)",
        "held-out",
    ),
    Setup(
        "cpu-mixed",
        CPU,
        _spec("burst", 32, 17, 64, mix=f"2:0.5,{UNDECLARED}:0.5", exact=True),
        "burst 32: half at 2 tok/s, half undeclared",
        "held-out",
    ),
    Setup(
        "cpu-nonstream",
        CPU,
        _spec("burst", 32, 17, 64, mix=UNDECLARED, streaming=False, exact=True),
        "burst 32 non-streaming",
        "held-out",
    ),
    Setup(
        "cpu-slow-small-kv",
        CPU,
        _spec("burst", 48, 64, 128, mix="1.5:0.4,2:0.6"),
        "burst 48 at 1.5/2 tok/s, 160-page KV (holds 13)",
        "held-out",
        num_device_pages=160,
    ),
]
QUICK = {"4090-a", "4090-b", "4090-c", "h200-b", "cpu-overload"}


def requests_for(setup: Setup) -> list[Request]:
    if isinstance(setup.spec, WorkloadSpec):
        return make_requests(setup.spec)
    trace = setup.spec
    return load_trace(
        AZURE_DIR / trace.file,
        skip=trace.skip,
        limit=trace.limit,
        time_scale=trace.time_scale,
        max_input=trace.max_input,
        rates=MIX,
    )


def profile_for(setup: Setup):
    profile = get_profile(setup.profile)
    if setup.num_device_pages is None:
        return profile
    return replace(profile, num_device_pages=setup.num_device_pages)


def demand_over_capacity(setup: Setup) -> float:
    """Declared reading demand / decode capacity at the batch the KV holds (paper Eq. 6).

    Demand: the tokens all readers read (sum of L_i) over the time they read in, taken as the
    arrival span plus the mean reading time (L_i / r_i); for a burst that is the sum of rates.
    Capacity: decode tokens/s at the batch that fits in device KV at the mean lifetime context
    (input + output / 2). Above 1 the device cannot keep every reader fed.
    """
    profile = profile_for(setup)
    reqs = requests_for(setup)
    mean_ctx = float(np.mean([r.num_prompt_tokens + r.sampling.max_tokens / 2 for r in reqs]))
    batch = max(1, min(profile.max_batch_size, int(profile.device_kv_tokens // mean_ctx)))
    capacity = batch / profile.step_s(num_decode=batch, decode_contexts=[int(mean_ctx)] * batch)
    span = max(r.arrival_s for r in reqs) - min(r.arrival_s for r in reqs)
    reading = float(np.mean([r.sampling.max_tokens / r.consumption_rate for r in reqs]))
    demand = sum(r.sampling.max_tokens for r in reqs) / (span + reading)
    return demand / capacity


def run_one(task: tuple[str, str]) -> dict:
    setup_name, policy_name = task
    setup = next(s for s in SETUPS if s.name == setup_name)
    reqs = requests_for(setup)
    policy = make_policy(policy_name)
    result = simulate(policy, reqs, profile_for(setup))
    s, st = result.summary, result.stats
    latencies = [r.reader.gen_times_s[-1] - r.arrival_s for r in result.requests]
    ttfts = [
        (r.reader.first_token_s - r.arrival_s) if r.reader.first_token_s is not None else math.nan
        for r in result.requests
    ]
    picks = np.linspace(0, len(result.requests) - 1, 6).astype(int)
    timelines = []
    for i in picks:
        r = result.requests[i]
        stride = max(1, len(r.reader.gen_times_s) // 400)  # keep plots and workers light
        timelines.append((r.consumption_rate, stride, r.reader.gen_times_s[::stride]))
    return {
        "setup": setup_name,
        "policy": policy_name,
        "mean_ttft_s": s["mean_ttft_s"],
        "p99_ttft_s": s["p99_ttft_s"],
        "mean_latency_s": float(np.mean(latencies)),
        "effective_throughput": s["effective_throughput"],
        "raw_throughput": s["raw_throughput"],
        "stall_ratio": s["stall_ratio"],
        "preemptions": st["num_preemptions"],
        "mean_ttft_ms": 1e3 * s["mean_ttft_s"],
        "p99_ttft_ms": 1e3 * s["p99_ttft_s"],
        "p50_ttft_s": s["p50_ttft_s"],
        "qos": s["qos"],
        "num_requests": s["num_requests"],
        "num_tokens": s["num_tokens"],
        "loads": st["num_loads"],
        "recomputes": st["num_recomputes"],
        "mean_load_s": st["load_s"] / max(1, st["num_loads"]),
        "sim_s": st["sim_end_s"],
        "steps": st["num_steps"],
        "mean_plan_ms": st["mean_plan_ms"],
        "wall_s": st["wall_s"],
        "fallback_decisions": getattr(policy, "num_fallback_decisions", None),
        "_ttfts": ttfts,
        "_timelines": timelines,
    }


def print_table(rows: list[dict], loads: dict[str, float]) -> None:
    """One table per group; ratios against the setup's fcfs row (1.00 without one)."""
    base = {r["setup"]: r for r in rows if r["policy"] == "fcfs"}
    group = {s.name: s.group for s in SETUPS}
    head = (
        f"{'setup':17s} {'load':>5s} {'policy':13s} {'meanTTFT':>9s} {'p99TTFT':>9s} "
        f"{'latency':>8s} {'eff tok/s':>10s} {'raw tok/s':>10s} {'stall':>6s} {'preempt':>7s} "
        f"{'p99 x':>6s} {'lat x':>6s} {'eff x':>6s} {'raw x':>6s}"
    )

    def ratio(r: dict, b: dict, key: str) -> float:
        return r[key] / b[key] if b[key] else math.nan

    for name in GROUPS:
        mine = [r for r in rows if group[r["setup"]] == name]
        if not mine:
            continue
        print(f"\n== {name} ==")
        print(head)
        print("-" * len(head))
        for r in mine:
            b = base.get(r["setup"], r)
            print(
                f"{r['setup']:17s} {loads[r['setup']]:5.2f} {r['policy']:13s} "
                f"{r['mean_ttft_s']:9.2f} {r['p99_ttft_s']:9.2f} {r['mean_latency_s']:8.2f} "
                f"{r['effective_throughput']:10.1f} {r['raw_throughput']:10.1f} "
                f"{r['stall_ratio']:6.3f} {r['preemptions']:7d} "
                f"{ratio(r, b, 'p99_ttft_s'):6.2f} {ratio(r, b, 'mean_latency_s'):6.2f} "
                f"{ratio(r, b, 'effective_throughput'):6.2f} {ratio(r, b, 'raw_throughput'):6.2f}"
            )


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(dict.fromkeys(r["setup"] for r in rows))
    for name in setups:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in (r for r in rows if r["setup"] == name):
            t = np.sort(np.nan_to_num(np.array(r["_ttfts"]), nan=np.inf))
            ax.plot(t, np.arange(1, len(t) + 1) / len(t), label=r["policy"])
        ax.set(xlabel="TTFT (s)", ylabel="CDF", title=f"TTFT CDF: {name}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"ttft_cdf_{name}.png", dpi=110)
        plt.close(fig)
    for name in (s for s in TIMELINE_SETUPS if s in setups):
        policy_rows = [r for r in rows if r["setup"] == name]
        fig, axes = plt.subplots(
            1, len(policy_rows), figsize=(4 * len(policy_rows), 3.5), sharey=True, squeeze=False
        )
        for ax, r in zip(axes[0], policy_rows, strict=True):
            for k, (rate, stride, gen) in enumerate(r["_timelines"]):
                if not gen:
                    continue
                tokens = np.arange(len(gen)) * stride + 1
                ax.plot(gen, tokens, color=f"C{k}", lw=1.2)
                # The reader if it never stalled: one token every 1/rate from the first.
                ax.plot(
                    [gen[0], gen[0] + tokens[-1] / rate],
                    [1, tokens[-1]],
                    color=f"C{k}",
                    ls=":",
                    lw=0.8,
                )
            ax.set(title=r["policy"], xlabel="time (s)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("tokens generated (dotted: reading)")
        fig.suptitle(f"Token timelines of six requests: {name}")
        fig.tight_layout()
        fig.savefig(out / f"timelines_{name}.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sched":
        from tfjax.bench import sim_sched

        return sim_sched.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="tfjax bench sim", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=f"only {sorted(QUICK)}")
    parser.add_argument("--only", default="", help="comma-separated setup names")
    parser.add_argument("--group", choices=GROUPS, help="only the setups of this group")
    parser.add_argument(
        "--policies", default=",".join(POLICY_NAMES), help="comma-separated, fcfs first"
    )
    args = parser.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    names = [s.name for s in SETUPS]
    if args.only:
        names = [n for n in args.only.split(",") if n]
    elif args.quick:
        names = [n for n in names if n in QUICK]
    elif args.group:
        names = [s.name for s in SETUPS if s.group == args.group]
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [(n, p) for n in names for p in policies]
    # Biggest first so the pool stays busy at the end.
    weight = {
        s.name: sum(r.sampling.max_tokens for r in requests_for(s))
        for s in SETUPS
        if s.name in names
    }
    tasks.sort(key=lambda t: -weight[t[0]])
    loads = {n: demand_over_capacity(next(s for s in SETUPS if s.name == n)) for n in names}
    start = time.perf_counter()
    rows = []
    with multiprocessing.Pool(args.jobs) as pool:
        for i, row in enumerate(pool.imap_unordered(run_one, tasks), 1):
            rows.append(row)
            print(
                f"[{i:2d}/{len(tasks)}] {row['setup']:11s} {row['policy']:13s} "
                f"sim {row['sim_s']:7.1f}s in {row['wall_s']:5.1f}s "
                f"(elapsed {time.perf_counter() - start:5.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order[r["setup"]], policies.index(r["policy"])))
    print_table(rows, loads)
    plot(rows, args.out)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    for r in public:
        r["demand_over_capacity"] = loads[r["setup"]]
    (args.out / "summary.json").write_text(json.dumps(public, indent=1))
    print(f"wrote {args.out / 'summary.json'} and plots in {time.perf_counter() - start:.0f}s")
    return 0
