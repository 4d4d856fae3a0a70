"""`tfjax bench mixed-lengths`: short streams beside one long prompt, through the server.

    tfjax bench mixed-lengths --out out/mixed [--policies fcfs,fcfs-chunked,tokenflow]

For each policy, one `tfjax serve --max-model-len 4096` (otherwise default flags, or
`--server-args`) and two runs against it, all requests streamed by a plain OpenAI-style client
without a declared rate (`tfjax bench serve`'s client):
- alone:  `--short` streams of `--short-len`-token prompts, all at once, `--max-tokens` each;
- beside: as many fresh short streams and one `--long-len`-token prompt, sent at the same
          moment (the long one first, so FCFS orders it first).
Reported per policy: the short streams' throughput (their tokens over the time until the last
of them finished) in both runs and its ratio, their mean and largest TTFT, and the long
request's TTFT and end (what capping its chunks with `--long-prefill-token-threshold` costs
it). Every run draws fresh prompts (its own seed), so the prefix cache cannot help, unless
`--cached-long` sends the long prompt once before the beside run (a long document that many
requests share).
Writes DIR/bench_mixed_lengths.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from tfjax.bench.client import ClientConfig, RequestRecord, run_requests
from tfjax.bench.flags import HelpFormatter
from tfjax.bench.server import tfjax_server
from tfjax.bench.workload import ClientRequest

LONG = 0  # index of the long request in the beside run


def requests(num_short: int, short_len: int, max_tokens: int, long_len: int) -> list[ClientRequest]:
    """The long request (if `long_len`) first, then the short ones, all arriving at once."""
    shorts = [
        ClientRequest(
            index=LONG + 1 + i,
            arrival_s=0.0,
            prompt_len=short_len,
            output_len=max_tokens,
            rate=15.0,
            declared=False,
        )
        for i in range(num_short)
    ]
    if not long_len:
        return shorts
    long = ClientRequest(
        index=LONG, arrival_s=0.0, prompt_len=long_len, output_len=max_tokens, rate=15.0,
        declared=False,
    )  # fmt: skip
    return [long, *shorts]


def short_figures(records: Sequence[RequestRecord]) -> dict[str, float]:
    """Throughput and TTFT of the short streams of one run (times from the run's start)."""
    shorts = [r for r in records if r.index != LONG]
    failed = [r for r in shorts if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} short requests failed: {failed[0].error}")
    ttfts = [r.chunk_times_s[0] - r.scheduled_s for r in shorts]
    return {
        "short_tok_s": sum(r.output_tokens for r in shorts) / max(r.end_s for r in shorts),
        "short_mean_ttft_s": statistics.mean(ttfts),
        "short_max_ttft_s": max(ttfts),
    }


def long_figures(records: Sequence[RequestRecord]) -> dict[str, float]:
    """When the long request got its first token and its last: what a cap on its chunks
    (`--long-prefill-token-threshold`) trades for the short streams' throughput."""
    (long,) = (r for r in records if r.index == LONG)
    if not long.ok:
        raise RuntimeError(f"the long request failed: {long.error}")
    return {"long_ttft_s": long.chunk_times_s[0] - long.scheduled_s, "long_end_s": long.end_s}


def send_all(cfg: ClientConfig, reqs: list[ClientRequest]) -> list[RequestRecord]:
    return asyncio.run(run_requests(cfg, reqs, progress=False))[0]


def run_policy(policy: str, args: argparse.Namespace, out_dir: Path) -> dict:
    flags = ["--max-model-len", str(args.max_model_len), *shlex.split(args.server_args)]
    log = out_dir / f"serve_{policy}.log"
    with tfjax_server(policy, flags, log, args.start_timeout) as server:

        def config(seed: int) -> ClientConfig:
            return ClientConfig(base_url=server.base_url, model=server.model, seed=seed)

        short = (args.short, args.short_len, args.max_tokens)
        print(f"{policy}: {args.short} short streams alone", file=sys.stderr, flush=True)
        alone = short_figures(send_all(config(1), requests(*short, 0)))
        beside_requests = requests(*short, args.long_len)
        if args.cached_long:  # the same long prompt (seed 2, index LONG) once, to cache it
            send_all(config(2), beside_requests[:1])
        print(f"{policy}: the same beside a {args.long_len}-token prompt", file=sys.stderr)
        records = send_all(config(2), beside_requests)
        beside = short_figures(records) | long_figures(records)
    return {
        "policy": policy,
        "alone": alone,
        "beside": beside,
        "ratio": beside["short_tok_s"] / alone["short_tok_s"],
    }


def format_rows(rows: list[dict]) -> str:
    lines = [
        f"{'policy':>13} {'alone tok/s':>11} {'beside tok/s':>12} {'ratio':>6}"
        f" {'TTFT mean/max alone':>20} {'TTFT mean/max beside':>21} {'long TTFT/end':>14}"
    ]
    for row in rows:
        a, b = row["alone"], row["beside"]
        lines.append(
            f"{row['policy']:>13} {a['short_tok_s']:>11.1f} {b['short_tok_s']:>12.1f}"
            f" {row['ratio']:>6.2f} {a['short_mean_ttft_s']:>9.2f} / {a['short_max_ttft_s']:<8.2f}"
            f" {b['short_mean_ttft_s']:>10.2f} / {b['short_max_ttft_s']:<8.2f}"
            f" {b['long_ttft_s']:>6.2f} / {b['long_end_s']:<6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_policy(p, args, args.out) for p in args.policies.split(",")]
    print("\n" + format_rows(rows))
    result = {"args": {k: str(v) for k, v in vars(args).items() if not callable(v)}, "rows": rows}
    (args.out / "bench_mixed_lengths.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_mixed_lengths.json'}", file=sys.stderr)
    return 0


def build_parser(prog: str = "tfjax bench mixed-lengths") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--policies", default="fcfs,fcfs-chunked,tokenflow")
    parser.add_argument("--short", type=int, default=31, help="short streams")
    parser.add_argument("--short-len", type=int, default=17, help="their prompt tokens")
    parser.add_argument("--long-len", type=int, default=3000, help="the long prompt's tokens")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--cached-long", action="store_true", help="send the long prompt first")
    parser.add_argument("--server-args", default="", help="more `tfjax serve` flags")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("out/bench_mixed_lengths"))
    return parser
