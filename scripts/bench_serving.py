"""Streaming load generator for any OpenAI-compatible server, scored with the reader model.

Sends streaming `POST /v1/completions` requests (`stream: true`, `stream_options.include_usage`)
on an arrival schedule (burst, Poisson, gamma, or a replayed trace; `scripts/workload_client.py`
draws it), each with a consumption rate from a mix (`consumption_rate` in the body, our extension;
`ignore_eos` forces the drawn output length). A `ClientRequest` may also leave its rate
undeclared (the server's default applies; the reader model still reads at `rate`) or be a
non-streaming call (`stream: false`: its tokens arrive at once with the response, so TTFT is
its whole latency). Every client records when each token arrived and
feeds `tfjax.buffers.Reader`, so TTFT, stall, stall ratio, effective and raw throughput and QoS
come from `tfjax.qos` with the exact definitions of docs/definitions.md, measured at the client.

Token counting: an SSE chunk counts `usage.completion_tokens` growth when the server sends usage
on every chunk (vLLM's `continuous_usage_stats`), else the length of a `token_ids` field, else
one token per chunk with text. If the final usage reports more tokens than were counted (a
server that held back bytes of a partial character sends two tokens in one chunk), the missing
tokens are added to the last chunk and counted per request in `tokens_added_at_end`.

Failed requests (HTTP errors, error events, timeouts, streams without [DONE]) are left out of
the latency and streaming metrics, as in vLLM's benchmark, and counted in `failed`: look at that
number before trusting the others. `/metrics` is scraped before and after the run; counters
that grew are reported, and `preemptions` is the growth of `tfjax_preemptions_total`.

Output: a table on stdout, a progress line on stderr, and with `--out DIR` DIR/result.json (vLLM's
key names where one exists, plus ours and one record per request) and PNG plots.

    .venv/bin/python scripts/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --arrival burst --burst-size 6 --output-len-mean 32 --out out/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from workload_client import (
    ClientRequest,
    add_workload_arguments,
    make_prompt,
    requests_from_args,
    workload_summary,
)

from tfjax.buffers import Reader
from tfjax.qos import TokenTimeline, effective_tokens, summarize

# Preemption counters of the servers we know: ours, and vLLM's.
PREEMPTION_COUNTERS = ("tfjax_preemptions_total", "vllm:num_preemptions_total")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    base_url: str
    model: str
    prompt_mode: str = "ids"  # "ids" (token-id list) or "text"
    ignore_eos: bool = True
    extensions: bool = True  # send consumption_rate and ignore_eos
    temperature: float | None = None  # None: the server's default
    request_timeout_s: float = 600.0
    max_concurrency: int | None = None  # client-side cap; waiting for a slot is not in TTFT
    seed: int = 0  # of the prompts
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every body


@dataclass(slots=True)
class RequestRecord:
    """What one client saw. Times are seconds since the start of the run."""

    index: int
    rate: float
    prompt_len: int  # as sent; the server's count replaces it when usage arrives
    max_tokens: int
    scheduled_s: float
    send_s: float = math.nan
    end_s: float = math.nan
    chunk_times_s: list[float] = field(default_factory=list)  # chunks carrying tokens
    chunk_tokens: list[int] = field(default_factory=list)
    output_tokens: int = 0
    tokens_added_at_end: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.output_tokens > 0


async def send_request(
    client: httpx.AsyncClient, cfg: ClientConfig, req: ClientRequest, t0: float
) -> RequestRecord:
    """Wait for `req`'s arrival time (relative to `t0`, a perf_counter value), stream it."""
    rec = RequestRecord(
        index=req.index,
        rate=req.rate,
        prompt_len=req.prompt_len,
        max_tokens=req.output_len,
        scheduled_s=req.arrival_s,
    )
    body: dict[str, Any] = {
        "model": cfg.model,
        "prompt": make_prompt(req, mode=cfg.prompt_mode, seed=cfg.seed),
        "max_tokens": req.output_len,
        "stream": req.stream,
    }
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.extensions:
        if req.declared:
            body["consumption_rate"] = req.rate
        body["ignore_eos"] = cfg.ignore_eos
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.extra_body)
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    rec.send_s = time.perf_counter() - t0
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            receive = _stream if req.stream else _complete
            await receive(client, cfg.base_url + "/v1/completions", body, rec, t0)
    except TimeoutError:
        rec.error = f"timeout after {cfg.request_timeout_s} s"
    except (httpx.HTTPError, OSError, ValueError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    rec.end_s = time.perf_counter() - t0
    return rec


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord, t0: float
) -> None:
    usage_tokens: int | None = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            rec.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        done = False
        async for line in sse_lines(resp):
            now = time.perf_counter() - t0
            if not line.startswith("data:"):
                continue  # blank separators, ":" comments (keep-alive pings), other fields
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                rec.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                continue
            usage = chunk.get("usage") or {}
            choices = chunk.get("choices") or []
            n = _chunk_tokens(choices, usage, rec.output_tokens)
            if n:
                rec.chunk_times_s.append(now)
                rec.chunk_tokens.append(n)
                rec.output_tokens += n
            if usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                rec.prompt_len = int(usage["prompt_tokens"])
            for choice in choices:
                rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
    if rec.error is None and not done:
        rec.error = "stream ended without [DONE]"
    if usage_tokens is not None and usage_tokens > rec.output_tokens and rec.chunk_tokens:
        rec.tokens_added_at_end = usage_tokens - rec.output_tokens
        rec.chunk_tokens[-1] += rec.tokens_added_at_end
        rec.output_tokens = usage_tokens


async def _complete(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], rec: RequestRecord, t0: float
) -> None:
    """A non-streaming call: every token arrives with the response, as one chunk."""
    resp = await client.post(url, json=body)
    now = time.perf_counter() - t0
    if resp.status_code != 200:
        rec.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
        return
    answer = resp.json()
    usage = answer.get("usage") or {}
    rec.output_tokens = int(usage.get("completion_tokens") or 0)
    rec.prompt_len = int(usage.get("prompt_tokens") or rec.prompt_len)
    if rec.output_tokens:
        rec.chunk_times_s.append(now)
        rec.chunk_tokens.append(rec.output_tokens)
    for choice in answer.get("choices") or []:
        rec.finish_reason = choice.get("finish_reason") or rec.finish_reason


def _chunk_tokens(choices: list[dict[str, Any]], usage: dict[str, Any], counted: int) -> int:
    """Tokens carried by one chunk (see the module docstring for the order of evidence)."""
    if not choices:
        return 0  # the final usage chunk
    if usage.get("completion_tokens") is not None:
        return max(0, int(usage["completion_tokens"]) - counted)
    choice = choices[0]
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return 1 if text else 0


def reader_of(rec: RequestRecord) -> tuple[Reader, list[float]]:
    """The reader model fed with `rec`'s tokens, and the time each token was read."""
    reader = Reader(rec.rate)
    read_times = []
    for t, n in zip(rec.chunk_times_s, rec.chunk_tokens, strict=True):
        for _ in range(n):
            reader.on_token(t)
            read_times.append(reader.last_read_s)
    return reader, read_times


def timeline_of(rec: RequestRecord) -> TokenTimeline:
    return TokenTimeline(arrival_s=rec.send_s, reader=reader_of(rec)[0], output_len=None)


@dataclass(slots=True)
class _Progress:
    total: int
    sent: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0

    def line(self, elapsed_s: float) -> str:
        return (
            f"[bench] due {self.sent}/{self.total}  done {self.done}  failed {self.failed}  "
            f"tokens {self.tokens}  {elapsed_s:6.1f} s"
        )


async def run_requests(
    cfg: ClientConfig, requests: Sequence[ClientRequest], *, progress: bool = True
) -> tuple[list[RequestRecord], float]:
    """Send every request on its schedule; returns the records and the run's wall time."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=None, write=30.0, pool=None)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    state = _Progress(total=len(requests))

    async def one(client: httpx.AsyncClient, req: ClientRequest, t0: float) -> RequestRecord:
        if sem is None:
            rec = await send_request(client, cfg, req, t0)
        else:
            async with sem:
                rec = await send_request(client, cfg, req, t0)
        state.done += 1
        state.failed += not rec.ok
        state.tokens += rec.output_tokens
        return rec

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(client, r, t0)) for r in requests]
        ticker = asyncio.create_task(_report(state, requests, t0)) if progress else None
        try:
            records = await asyncio.gather(*tasks)
        finally:
            if ticker is not None:
                ticker.cancel()
        duration = time.perf_counter() - t0
    if progress:
        print("\r" + state.line(duration), file=sys.stderr, flush=True)
    return list(records), duration


async def _report(state: _Progress, requests: Sequence[ClientRequest], t0: float) -> None:
    tty = sys.stderr.isatty()
    period = 0.5 if tty else 5.0
    while True:
        await asyncio.sleep(period)
        elapsed = time.perf_counter() - t0
        state.sent = sum(r.arrival_s <= elapsed for r in requests)
        print(
            ("\r" if tty else "") + state.line(elapsed),
            end="" if tty else "\n",
            file=sys.stderr,
            flush=True,
        )


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines as SSE ends them (LF, CRLF or CR, never inside a JSON string):
    httpx's `aiter_lines` also splits at U+2028, U+2029 and U+0085, which a server may send
    raw inside an event's JSON."""
    buffer = ""
    async for text in resp.aiter_text():
        *lines, buffer = re.split(r"\r\n|\r|\n", buffer + text)
        for line in lines:
            yield line
    if buffer:
        yield buffer


async def scrape_counters(base_url: str) -> dict[str, float] | None:
    """Every counter sample of the server's /metrics (`name{labels}` -> value), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            resp = await client.get(base_url + "/metrics")
        if resp.status_code != 200:
            return None
        counters = {}
        for family in text_string_to_metric_families(resp.text):
            if family.type not in ("counter", "unknown"):  # unknown: not matched to a TYPE
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                    counters[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return counters
    except (httpx.HTTPError, OSError, ValueError):
        return None


def counter_delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}


def _stats(prefix: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    """vLLM's mean/median/std/pP keys, in milliseconds."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:  # None, not NaN: result.json stays strict JSON
        names = ["mean", "median", "std", *(f"p{p:g}" for p in percentiles)]
        return {f"{n}_{prefix}_ms": None for n in names}
    out = {
        f"mean_{prefix}_ms": float(np.mean(ms)),
        f"median_{prefix}_ms": float(np.median(ms)),
        f"std_{prefix}_ms": float(np.std(ms)),
    }
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    *,
    percentiles: Sequence[float] = (99,),
    lam: float = 1.0,
    mu: float = 1.0,
) -> dict[str, Any]:
    """The run's metrics: vLLM's keys for the latencies, `tfjax.qos.summarize` for streaming."""
    ok = [r for r in records if r.ok]
    ttfts = [r.chunk_times_s[0] - r.send_s for r in ok]
    e2els = [r.end_s - r.send_s for r in ok]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:], strict=False)]
    tpots = [
        (r.chunk_times_s[-1] - r.chunk_times_s[0]) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1
    ]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out |= _stats(name, values, percentiles)
    if ok:
        timelines = [timeline_of(r) for r in ok]
        out |= summarize(timelines, lam=lam, mu=mu)
    out["tokens_added_at_end"] = sum(r.tokens_added_at_end for r in records)
    out["errors"] = sorted({r.error for r in records if r.error})[:10]
    return out


def request_rows(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """One JSON record per request, with its token arrival times and reader-model figures."""
    rows = []
    for r in records:
        row = asdict(r)
        if r.ok:
            t = timeline_of(r)
            row |= {
                "ttft_s": t.ttft_s,
                "stall_s": t.stall_s,
                "effective_tokens": effective_tokens(t),
                "e2el_s": r.end_s - r.send_s,
            }
        rows.append(row)
    return rows


async def benchmark(
    cfg: ClientConfig,
    requests: Sequence[ClientRequest],
    *,
    percentiles: Sequence[float] = (99,),
    progress: bool = True,
) -> tuple[dict[str, Any], list[RequestRecord]]:
    """One run: scrape /metrics, send everything, scrape again; returns (result, records)."""
    before = await scrape_counters(cfg.base_url)
    records, duration = await run_requests(cfg, requests, progress=progress)
    after = await scrape_counters(cfg.base_url)
    result = compute_metrics(records, duration, percentiles=percentiles)
    delta = counter_delta(before, after)
    result["server_counters_delta"] = delta
    known = [name for name in PREEMPTION_COUNTERS if after and name in after]
    result["preemptions"] = int(delta.get(known[0], 0)) if delta is not None and known else None
    result["config"] = asdict(cfg)
    result["requests"] = request_rows(records)
    return result, records


def format_table(result: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    p_keys = sorted(k for k in result if k.startswith("p") and k.endswith("_ttft_ms"))
    lines = [f"{' ' + title + ' ':=^60}"]
    rows: list[tuple[str, str] | str] = [
        ("Successful requests", "completed"),
        ("Failed requests", "failed"),
        ("Benchmark duration (s)", "duration"),
        ("Total input tokens", "total_input_tokens"),
        ("Total generated tokens", "total_output_tokens"),
        ("Request throughput (req/s)", "request_throughput"),
        ("Output token throughput (tok/s)", "output_throughput"),
        "Time to First Token",
        ("Mean TTFT (ms)", "mean_ttft_ms"),
        ("Median TTFT (ms)", "median_ttft_ms"),
        *[(f"P{k.split('_')[0][1:]} TTFT (ms)", k) for k in p_keys],
        "Inter-token Latency (per chunk)",
        ("Mean ITL (ms)", "mean_itl_ms"),
        ("Median ITL (ms)", "median_itl_ms"),
        *[(f"P{k.split('_')[0][1:]} ITL (ms)", k.replace("ttft", "itl")) for k in p_keys],
        "End-to-end Latency",
        ("Mean E2EL (ms)", "mean_e2el_ms"),
        ("P99 E2EL (ms)", "p99_e2el_ms"),
        "Streaming (reader model, docs/definitions.md)",
        ("Effective throughput (tok/s)", "effective_throughput"),
        ("Raw throughput (tok/s)", "raw_throughput"),
        ("Stall ratio", "stall_ratio"),
        ("Mean stall (s)", "mean_stall_s"),
        ("P99 stall (s)", "p99_stall_s"),
        ("QoS (Eq. 2, lambda=mu=1)", "qos"),
        ("Server preemptions (delta)", "preemptions"),
    ]
    for row in rows:
        if isinstance(row, str):
            lines.append(f"{row:-^60}")
        elif row[1] in result:
            lines.append(f"{row[0] + ':':<44}{fmt(result[row[1]]):>16}")
    lines.append("=" * 60)
    if result.get("errors"):
        lines.append("errors: " + "; ".join(result["errors"]))
    return "\n".join(lines)


def save(
    result: dict[str, Any], records: Sequence[RequestRecord], out_dir: Path, *, plots: bool = True
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if plots:
        import _bench_plots

        _bench_plots.plot_run(records, out_dir)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("client")
    g.add_argument(
        "--prompt-mode",
        choices=["ids", "text"],
        default="ids",
        help="prompt as a token-id list, or as random words (about 1 token each)",
    )
    g.add_argument("--no-ignore-eos", action="store_false", dest="ignore_eos")
    g.add_argument(
        "--no-extensions",
        action="store_false",
        dest="extensions",
        help="send neither consumption_rate nor ignore_eos",
    )
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument(
        "--extra-body",
        type=json.loads,
        default={},
        help="JSON merged into every request body, e.g. '{\"response_format\": {...}}'",
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight")
    g.add_argument("--metric-percentiles", default="99", help="e.g. 50,90,99")
    g.add_argument("--no-progress", action="store_false", dest="progress")
    g.add_argument("--no-plots", action="store_false", dest="plots")


def client_config(args: argparse.Namespace, base_url: str, model: str) -> ClientConfig:
    return ClientConfig(
        base_url=base_url.rstrip("/"),
        model=model,
        prompt_mode=args.prompt_mode,
        ignore_eos=args.ignore_eos,
        extensions=args.extensions,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        extra_body=args.extra_body,
    )


def percentiles_of(args: argparse.Namespace) -> list[float]:
    return [float(p) for p in args.metric_percentiles.split(",") if p]


def served_model(base_url: str) -> str:
    """The first model `/v1/models` lists."""
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as the description, and every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--out", type=Path, default=None, help="write DIR/result.json and plots")
    parser.add_argument("--dry-run", action="store_true", help="print the workload, send nothing")
    add_workload_arguments(parser)
    add_client_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = requests_from_args(args)
    print(f"workload: {json.dumps(workload_summary(requests))}", file=sys.stderr)
    if args.dry_run:
        return 0
    model = args.model or served_model(args.base_url)
    cfg = client_config(args, args.base_url, model)
    result, records = asyncio.run(
        benchmark(cfg, requests, percentiles=percentiles_of(args), progress=args.progress)
    )
    result["workload"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(format_table(result))
    if args.out is not None:
        save(result, records, args.out, plots=args.plots)
        print(f"wrote {args.out / 'result.json'}", file=sys.stderr)
    return 0 if result["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
