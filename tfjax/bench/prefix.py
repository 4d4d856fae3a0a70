"""`tfjax bench prefix`: prefix caching on a chat workload, TTFT and throughput with and
without the cache.

    tfjax bench prefix --out out/bench_prefix [--prefix-len 900 --concurrent 16]

Served in-process (one compiled runner shared by every variant, tokenflow policy):
- shared: one warm request with a ~`--prefix-len`-token system prompt, then `--concurrent`
  requests with the same system prompt and their own question, all at once. Reported: mean
  and p90 TTFT, output tokens/s over the burst, prefix hit rate, and whether every output
  equals the no-cache run's.
- chat: `--conversations` multi-turn conversations of `--turns` turns (each turn's prompt is
  the system prompt, the conversation so far and a new user message; the next turn starts
  when the answer is complete) on a device pool of `--chat-kv-pages` pages, small enough that
  cached pages are evicted between turns, so the host level matters.
- evicted: the shared burst again, but after the warm request `--evict-fillers` unrelated
  prompts of the same length run one after another on a device pool of `--evict-kv-pages`
  pages, so the system prompt's cached pages are evicted from the device (least recently used
  first) before the burst arrives: the device cache misses, and the host level (where
  write-through left a copy of every full page) can load the prefix back instead of
  recomputing it. This is the phase that measures the second level.
Variants: no-cache (`--no-prefix-cache`), device (cache without the host tier,
`--no-offload`), device+host (the default). Issue 16's target, on an idle CPU with the
default model: shared mean TTFT of device+host <= 0.4x of no-cache, outputs identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np

from tfjax.api import Delta
from tfjax.assembly import assemble_engine, device_transfers
from tfjax.bench.flags import HelpFormatter
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.prefix import PrefixStats
from tfjax.progress import ProgressBar
from tfjax.request import Request, SamplingParams
from tfjax.runner import Runner
from tfjax.runner_setup import load_runner

VARIANTS = {  # name -> (prefix cache, host tier)
    "no-cache": (False, True),
    "device": (True, False),
    "device+host": (True, True),
}


class Timed:
    """The engine's emit callback: first-token time and tokens of every request."""

    def __init__(self) -> None:
        self.submitted: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.tokens: dict[str, list[int]] = {}
        self.finished: list[str] = []

    def submit(self, engine: Engine, request: Request) -> None:
        self.submitted[request.request_id] = time.perf_counter()
        engine.add_request(request)

    def __call__(self, request_id: str, delta: Delta) -> None:
        if delta.token_ids and request_id not in self.first:
            self.first[request_id] = time.perf_counter()
        self.tokens.setdefault(request_id, []).extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finished.append(request_id)

    def ttft_s(self, ids: list[str]) -> list[float]:
        return [self.first[i] - self.submitted[i] for i in ids]


def make_engine(runner: Runner, variant: str, num_pages: int, args) -> tuple[Engine, Timed]:
    prefix_cache, host = VARIANTS[variant]
    config = EngineConfig(
        page_size=runner.page_size,
        num_pages=num_pages,
        max_batch_size=args.concurrent,
        prefill_token_budget=512,
        prefix_cache=prefix_cache,
        offload=host,
        host_kv_gb=args.host_kv_gb,
    )
    timed = Timed()
    engine = assemble_engine(
        runner,
        runner,
        _NoText(),
        config,
        transfers=device_transfers(runner.pages_sharding),
        emit=timed,
        model_id="b",
    )
    return engine, timed


class _NoText:
    """Token ids only: the benchmark compares ids, so it needs no text."""

    eos_token_ids = frozenset()

    def decode(self, ids) -> str:
        return ""


def request(request_id: str, prompt: list[int], max_tokens: int) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, prompt, params, time.monotonic(), consumption_rate=1e3)


def run_until_idle(engine: Engine) -> None:
    while engine.has_work:
        engine.step()


def shared_prefix(runner: Runner, variant: str, args, rng: np.random.Generator) -> dict:
    return _shared_burst(runner, variant, args, rng, num_pages=args.kv_pages, fillers=0)


def evicted_prefix(runner: Runner, variant: str, args, rng: np.random.Generator) -> dict:
    return _shared_burst(
        runner, variant, args, rng, num_pages=args.evict_kv_pages, fillers=args.evict_fillers
    )


def _shared_burst(
    runner: Runner, variant: str, args, rng: np.random.Generator, *, num_pages: int, fillers: int
) -> dict:
    """A warm request with the system prompt, `fillers` unrelated prompts one after another
    (each pushes older cached pages out of the device pool), then the burst."""
    engine, timed = make_engine(runner, variant, num_pages, args)
    vocab = runner.cfg.vocab_size
    system = rng.integers(10, vocab, args.prefix_len).tolist()
    questions = [
        rng.integers(10, vocab, args.question_len).tolist() for _ in range(args.concurrent)
    ]
    timed.submit(engine, request("warm", [*system, *questions[0][::-1]], args.max_tokens))
    run_until_idle(engine)
    for i in range(fillers):
        filler = rng.integers(10, vocab, args.prefix_len + args.question_len).tolist()
        timed.submit(engine, request(f"filler{i}", filler, 1))
        run_until_idle(engine)
    ids = [f"q{i}" for i in range(args.concurrent)]
    before = _stats(engine)  # the burst's lookups only
    start = time.perf_counter()
    for i, question in zip(ids, questions, strict=True):
        timed.submit(engine, request(i, [*system, *question], args.max_tokens))
    run_until_idle(engine)
    seconds = time.perf_counter() - start
    ttft = timed.ttft_s(ids)
    return {
        "variant": variant,
        "mean_ttft_ms": 1e3 * statistics.mean(ttft),
        "p90_ttft_ms": 1e3 * float(np.percentile(ttft, 90)),
        "output_tok_s": len(ids) * args.max_tokens / seconds,
        **_cache_hits(engine, before),
        "outputs": {i: timed.tokens[i] for i in ids},
    }


def chat(runner: Runner, variant: str, args, rng: np.random.Generator) -> dict:
    engine, timed = make_engine(runner, variant, args.chat_kv_pages, args)
    vocab = runner.cfg.vocab_size
    system = rng.integers(10, vocab, args.prefix_len).tolist()
    history = {f"c{c}": list(system) for c in range(args.conversations)}
    questions = {  # drawn up front: turns finish in a different order in each variant
        c: [rng.integers(10, vocab, args.question_len).tolist() for _ in range(args.turns)]
        for c in history
    }
    turn = dict.fromkeys(history, 0)
    ids = []

    def next_turn(conversation: str) -> None:
        history[conversation] += questions[conversation][turn[conversation]]
        request_id = f"{conversation}t{turn[conversation]}"
        ids.append(request_id)
        timed.submit(engine, request(request_id, list(history[conversation]), args.max_tokens))

    before = _stats(engine)
    start = time.perf_counter()
    for conversation in history:
        next_turn(conversation)
    while engine.has_work:
        engine.step()
        for request_id in timed.finished:
            conversation = request_id.split("t")[0]
            history[conversation] += timed.tokens[request_id]
            turn[conversation] += 1
            if turn[conversation] < args.turns:
                next_turn(conversation)
        timed.finished.clear()
    seconds = time.perf_counter() - start
    ttft = timed.ttft_s(ids)
    return {
        "variant": variant,
        "mean_ttft_ms": 1e3 * statistics.mean(ttft),
        "output_tok_s": len(ids) * args.max_tokens / seconds,
        **_cache_hits(engine, before),
        "outputs": {i: timed.tokens[i] for i in ids},
    }


def _stats(engine: Engine) -> PrefixStats:
    """A copy of the prefix cache's counters (zeros when the cache is off)."""
    return replace(engine.kv.prefix.stats) if engine.kv.prefix else PrefixStats()


def _cache_hits(engine: Engine, before: PrefixStats) -> dict:
    """Hit rate and host-level hit tokens of the lookups made since `before`."""
    now = _stats(engine)
    queried = now.num_query_tokens - before.num_query_tokens
    device = now.num_hit_tokens - before.num_hit_tokens
    host = now.num_host_hit_tokens - before.num_host_hit_tokens
    return {"hit_rate": (device + host) / queried if queried else 0.0, "host_hit_tokens": host}


def report(name: str, rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{name}: {'variant':>12} {'mean TTFT ms':>12} {'x no-cache':>10} {'tok/s':>7} "
          f"{'hit rate':>8} {'host hits':>9} {'same outputs':>12}")  # fmt: skip
    for row in rows:
        row["ttft_vs_no_cache"] = row["mean_ttft_ms"] / base["mean_ttft_ms"]
        row["outputs_identical"] = row["outputs"] == base["outputs"]
        print(
            f"{'':>{len(name) + 1}} {row['variant']:>12} {row['mean_ttft_ms']:>12.1f} "
            f"{row['ttft_vs_no_cache']:>10.2f} {row['output_tok_s']:>7.1f} "
            f"{row['hit_rate']:>8.2f} {row['host_hit_tokens']:>9} {row['outputs_identical']!s:>12}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench prefix", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--prefix-len", type=int, default=900)
    parser.add_argument("--question-len", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--kv-pages", type=int, default=2048)
    parser.add_argument("--chat-kv-pages", type=int, default=160)
    parser.add_argument("--evict-kv-pages", type=int, default=320)
    parser.add_argument(
        "--evict-fillers",
        type=int,
        default=None,
        help="unrelated prompts run before the evicted burst (default: enough to fill the pool)",
    )
    parser.add_argument("--phases", default="shared,chat,evicted")
    parser.add_argument("--host-kv-gb", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_prefix"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    page_size = EngineConfig().page_size
    if args.evict_fillers is None:
        filler_pages = -(-(args.prefix_len + args.question_len + 1) // page_size)
        args.evict_fillers = -(-args.evict_kv_pages // filler_pages) + 1
    phases = {"shared": shared_prefix, "chat": chat, "evicted": evicted_prefix}
    chosen = args.phases.split(",")
    if unknown := set(chosen) - set(phases):
        parser.error(f"unknown phases {sorted(unknown)}; choose from {sorted(phases)}")

    chat_len = args.prefix_len + args.turns * (args.question_len + args.max_tokens)
    max_len = max(chat_len, args.prefix_len + args.question_len + args.max_tokens) + 32
    config = EngineConfig(max_batch_size=args.concurrent, prefill_token_budget=512)
    model, runner = load_runner(args.model, config, num_pages=args.kv_pages, max_model_len=max_len)
    runner.warmup(ProgressBar("step buckets"))
    results = {}
    for name in chosen:
        phase, rows = phases[name], []
        for variant in VARIANTS:
            print(f"{name}: {variant}", file=sys.stderr)
            rows.append(phase(runner, variant, args, np.random.default_rng(args.seed)))
        report(name, rows)
        results[name] = [{k: v for k, v in r.items() if k != "outputs"} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(jax.devices()[0]), "model": model.name, "args": vars(args), **results}
    (args.out / "bench_prefix.json").write_text(json.dumps(result, indent=2, default=str))
    return 0
