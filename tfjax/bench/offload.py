"""`tfjax bench offload`: preemption and resume costs of the host KV tier, and the paper's
Table 2 ablation.

    tfjax bench offload --out out/bench_offload [--contexts 256,1024,4096]

Part 1, per context length C: one request with C tokens of KV is preempted and resumed by
  (a) write-through swap: its full pages were copied during decoding, only the tail moves now;
  (b) write-back swap: everything is copied at preemption;
  (c) recompute: the KV is dropped and the C tokens are prefilled again.
  Reported: preempt (decision -> device pages free), host copy done (decision -> copy
  complete, the earliest a LOAD may start), resume (decision -> next token sampled), and the
  reader-visible stall in decode steps: (preempt + resume) / decode step time.
Part 2: the makespan of one burst served in-process by the tokenflow policy with the full
  host tier and with each mechanism switched off (--no-offload, --no-write-through,
  --no-overlap), like the paper's Table 2 (RTX 4090: 66.0 / 127.3 / 82.8 / 74.4 s).

CPU numbers: the "host link" is a memcpy between two CPU memory spaces, so swap costs are far
below a GPU's PCIe link; the ratios, not the absolute times, are what carries over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from tfjax.assembly import assemble_engine, device_transfers
from tfjax.bench.flags import HelpFormatter
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.progress import ProgressBar
from tfjax.request import Request, RequestStatus, SamplingParams
from tfjax.runner import Runner
from tfjax.runner_setup import load_runner
from tfjax.sched.base import Plan, PrefillChunk, Resume, ResumeMode
from tfjax.sched.registry import make_policy

HOST_KV_GB = 8.0


class Scripted:
    """A policy that returns the plan given by `next_plan`, once, then decodes everything
    running; it resumes by LOAD, so the engine keeps host copies."""

    name = "scripted"
    resumes_by_load = True

    def __init__(self) -> None:
        self.next: Plan | None = None

    def plan(self, view) -> Plan:
        plan, self.next = self.next, None
        return plan or Plan(decode=tuple(r.request_id for r in view.running))


def make_engine(runner: Runner, tokenizer, config: EngineConfig, policy) -> Engine:
    return assemble_engine(
        runner,
        runner,
        tokenizer,
        config,
        transfers=device_transfers(runner.pages_sharding),
        emit=None,
        policy=policy,
    )


def run_plan(engine: Engine, plan: Plan) -> None:
    engine.policy.next = plan
    engine.step()


def swap_costs(runner: Runner, tokenizer, context: int, mode: str) -> dict:
    """Preempt + resume one request holding `context` tokens of KV; mode: wt | wb | recompute."""
    config = EngineConfig(
        page_size=runner.page_size,
        max_batch_size=2,
        prefill_token_budget=512,
        offload=mode != "recompute",
        write_through=mode == "wt",
        host_kv_gb=HOST_KV_GB,
    )
    engine = make_engine(runner, tokenizer, config, Scripted())
    offload = engine.kv.offload
    prompt = np.random.default_rng(context).integers(10, runner.cfg.vocab_size, context).tolist()
    request = Request("r", prompt, SamplingParams(max_tokens=64, ignore_eos=True), 0.0, 10.0)
    engine.add_request(request)
    while request.status is not RequestStatus.RUNNING:
        engine.step()
    step_s = []
    for _ in range(16):  # decode a little; write-through copies the full pages meanwhile
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
    if offload:
        offload.transfers.d2h.drain()
    start = time.perf_counter()
    run_plan(engine, Plan(preempt=("r",)))
    preempt_s = time.perf_counter() - start
    copy_done_s = preempt_s
    if offload:
        offload.transfers.d2h.drain()
        copy_done_s = time.perf_counter() - start
    start = time.perf_counter()
    resume(engine, request, ResumeMode.RECOMPUTE if mode == "recompute" else ResumeMode.LOAD)
    jax.block_until_ready(runner.kv)
    resume_s = time.perf_counter() - start
    engine.abort("r")
    step = statistics.median(step_s)
    return {
        "context": context,
        "mode": mode,
        "preempt_ms": 1e3 * preempt_s,
        "host_copy_done_ms": 1e3 * copy_done_s,
        "resume_ms": 1e3 * resume_s,
        "decode_step_ms": 1e3 * step,
        "stall_steps": (preempt_s + resume_s) / step,
    }


def resume(engine: Engine, request: Request, mode: ResumeMode) -> None:
    """Resume a preempted request by `mode` and decode one token: by LOAD (the copy back runs
    off the engine thread, waited for here, then the step scatters the pages) or by
    RECOMPUTE (its tokens prefilled again in chunks of 512)."""
    rid = request.request_id
    if mode is ResumeMode.LOAD:
        run_plan(engine, Plan(resume=(Resume(request_id=rid, mode=mode),)))
        engine.kv.offload.transfers.h2d.drain()
        run_plan(engine, Plan(decode=(rid,)))
        return
    remaining = request.num_prefill_target
    resumes = (Resume(request_id=rid, mode=mode),)
    while remaining:
        n = min(512, remaining)
        prefill = (PrefillChunk(request_id=rid, num_tokens=n),)
        run_plan(engine, Plan(resume=resumes, prefill=prefill))
        resumes, remaining = (), remaining - n
    run_plan(engine, Plan(decode=(rid,)))


def burst_makespan(runner: Runner, tokenizer, args, variant: str) -> dict:
    config = EngineConfig(
        page_size=runner.page_size,
        max_batch_size=args.max_batch_size,
        prefill_token_budget=512,
        offload=variant != "no-offload",
        write_through=variant != "no-write-through",
        overlap=variant != "no-overlap",
        num_pages=args.burst_kv_pages,  # a smaller pool than the array: the burst must not fit
        host_kv_gb=HOST_KV_GB,
    )
    engine = make_engine(runner, tokenizer, config, make_policy("tokenflow"))
    offload = engine.kv.offload
    rng = np.random.default_rng(args.seed)
    for i in range(args.burst):
        prompt = rng.integers(10, runner.cfg.vocab_size, args.burst_prompt_len).tolist()
        params = SamplingParams(max_tokens=args.burst_output_len, ignore_eos=True)
        engine.add_request(Request(f"b{i}", prompt, params, engine.clock(), args.burst_rate))
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    makespan = time.perf_counter() - start
    stats = engine.kv.stats
    return {
        "variant": variant,
        "makespan_s": makespan,
        "preemptions": stats.num_preemptions,
        "loads": stats.num_loads,
        "host_full_fallbacks": stats.num_host_full_fallbacks,
        "bytes_d2h": offload.transfers.d2h.bytes_done if offload else 0,
        "bytes_h2d": offload.transfers.h2d.bytes_done if offload else 0,
    }


def format_swaps(swaps: list[dict]) -> str:
    lines = [
        f"{'context':>7} {'mode':>9} {'preempt ms':>10} {'copy done ms':>12} "
        f"{'resume ms':>9} {'step ms':>7} {'stall steps':>11}"
    ]
    for row in swaps:
        lines.append(
            f"{row['context']:>7} {row['mode']:>9} {row['preempt_ms']:>10.2f} "
            f"{row['host_copy_done_ms']:>12.2f} {row['resume_ms']:>9.1f} "
            f"{row['decode_step_ms']:>7.1f} {row['stall_steps']:>11.2f}"
        )
    return "\n".join(lines)


def format_bursts(bursts: list[dict]) -> str:
    full = bursts[0]["makespan_s"]
    lines = [f"{'variant':>17} {'makespan s':>10} {'x full':>6} {'preempts':>8} {'loads':>6}"]
    for row in bursts:
        lines.append(
            f"{row['variant']:>17} {row['makespan_s']:>10.1f} {row['makespan_s'] / full:>6.2f} "
            f"{row['preemptions']:>8} {row['loads']:>6}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench offload", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--burst-prompt-len", type=int, default=64)
    parser.add_argument("--burst-output-len", type=int, default=128)
    parser.add_argument("--burst-rate", type=float, default=8.0, help="tokens/s per reader")
    parser.add_argument("--burst-kv-pages", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_offload"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + 80
    config = EngineConfig(max_batch_size=args.max_batch_size, prefill_token_budget=512)
    num_pages = 2 + 2 * (max_len // 16) + 512
    model, runner = load_runner(args.model, config, num_pages=num_pages, max_model_len=max_len)
    runner.warmup(ProgressBar("step buckets"))
    swaps = []
    for context in contexts:
        for mode in ("wt", "wb", "recompute"):
            print(f"context {context}: {mode}", file=sys.stderr)
            swaps.append(swap_costs(runner, model.tokenizer, context, mode))
    print("\n" + format_swaps(swaps))
    bursts = []
    for variant in ("full", "no-offload", "no-write-through", "no-overlap"):
        print(f"burst: {variant}", file=sys.stderr)
        bursts.append(burst_makespan(runner, model.tokenizer, args, variant))
    print("\n" + format_bursts(bursts))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "device": str(jax.devices()[0]),
        "model": model.name,
        "swap": swaps,
        "burst": bursts,
        "burst_args": {k: v for k, v in vars(args).items() if "burst" in k},
    }
    (args.out / "bench_offload.json").write_text(json.dumps(result, indent=2, default=str))
    return 0
