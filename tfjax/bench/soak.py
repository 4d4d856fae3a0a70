"""`tfjax bench soak`: a bounded soak test of a tfjax server, steady streams, bursts, hang-ups
and bad requests.

Runs for `--minutes` (default 10) against `--base-url`, or against a server it starts itself
(`--start-server --model M`, extra `tfjax serve` flags in `--server-args`). Traffic, all at once:
- `--concurrency` workers, each sending one streaming completion after another (random prompt
  and output lengths, consumption rates, some seeded samples);
- every `--burst-every-s`, a burst of `--burst-size` streams at the same instant (whether or
  not the previous burst has finished);
- a share of streams (`--hangup-share`) closes its connection after a random number of events;
- every `--bad-every-s`, a hostile or malformed body from a fixed list, each with the class of
  answer it must get (400/404, or 200 for bodies that are odd but valid).

Every `--sample-s` it samples /metrics (device and host KV pages in use, queue lengths) and,
when it knows the server's PID (`--pid`, or the server it started), the server's RSS and open
file descriptors from /proc. Each minute it prints one line: requests, errors, hang-ups, bad
requests answered right, p50/p99 TTFT of the requests started that minute, pages, RSS, fds.

At the end it stops sending, waits for the server to go idle, and checks for leaks: device and
host pages back to 0, /health?deep=1 answering 200 (the engine's page-book invariants), and the
RSS and fd growth since the end of the first minute. Exit code 1 if any request errored (5xx,
error event, dropped connection, timeout) or anything leaked. `--out FILE` writes the per-minute
rows and the verdict as JSON.

    tfjax bench soak --minutes 2 --start-server --model default \\
        --server-args "--max-batch-size 8 --max-model-len 512 --kv-pages 256"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tfjax.bench.flags import HelpFormatter
from tfjax.bench.server import tfjax_server

WORDS = [  # prompt words: each is one token in common BPE vocabularies
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do",
]  # fmt: skip
FD_SLACK = 16  # open descriptors the server may gain (sockets in TIME_WAIT handling, caches)
RSS_SLACK = 0.25  # RSS growth after the first minute that counts as a leak


@dataclass
class Minute:
    """Counters of the requests started in one minute of the run."""

    requests: int = 0
    ok: int = 0
    errors: int = 0
    hangups: int = 0
    bad_answered_right: int = 0
    bad_answered_wrong: int = 0
    rejected_429: int = 0
    ttft_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(what[:200])

    def row(self, minute: int, sample: dict[str, float]) -> dict[str, Any]:
        ttft = np.asarray(self.ttft_s) * 1e3
        return {
            "minute": minute,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "hangups": self.hangups,
            "rejected_429": self.rejected_429,
            "bad_ok": self.bad_answered_right,
            "bad_wrong": self.bad_answered_wrong,
            "p50_ttft_ms": float(np.percentile(ttft, 50)) if len(ttft) else None,
            "p99_ttft_ms": float(np.percentile(ttft, 99)) if len(ttft) else None,
            **sample,
            "error_samples": self.error_samples[:5],
        }


def bad_requests(model: str) -> list[tuple[str, bytes, str]]:
    """(path, body, expected answer class): '4xx' or 'ok'."""
    c, chat = "/v1/completions", "/v1/chat/completions"

    def body(**fields: Any) -> bytes:
        return json.dumps({"model": model, **fields}).encode()

    return [
        (c, b"{not json", "4xx"),
        (c, b"[" * 50_000 + b"]" * 50_000, "4xx"),
        (c, b"[]", "4xx"),
        (c, body(prompt=5), "4xx"),
        (c, body(prompt="x", max_tokens=-1), "4xx"),
        (c, body(prompt="x", temperature="hot"), "4xx"),
        (c, body(prompt="x", temperature=10**400), "4xx"),
        (c, body(prompt="x", consumption_rate=5e-324), "4xx"),
        (c, body(prompt="\ud800 lone surrogate"), "4xx"),
        (c, body(prompt="word " * 100_000), "4xx"),
        (c, body(prompt="x", n=17), "4xx"),  # n is 1-16
        (c, body(prompt="x", response_format={"type": "json_schema"}), "4xx"),  # no schema
        (c, body(prompt="x", max_tokens=2, n=2, logprobs=2, presence_penalty=0.5), "ok"),
        (c, body(prompt="x", stop=["q" * 100 + str(i) for i in range(1000)]), "4xx"),
        (c, json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), "4xx"),
        (chat, body(messages=[]), "4xx"),
        (chat, body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "4xx"),
        (c, body(prompt="odd but valid", max_tokens=4, top_k=2**40, seed=-(2**63)), "ok"),
        (c, body(prompt=[1, 2, 3], max_tokens=4, stop=["\U0001f642"], priority=2**62), "ok"),
    ]


class Soak:
    def __init__(self, args: argparse.Namespace, base_url: str, pid: int | None) -> None:
        self.args = args
        self.base_url = base_url
        self.pid = pid
        self.rng = random.Random(args.seed)
        self.start_s = time.monotonic()
        self.deadline_s = self.start_s + args.minutes * 60
        self.minutes: dict[int, Minute] = defaultdict(Minute)
        self.samples: dict[int, dict[str, float]] = {}
        self.model = ""
        self.bad: list[tuple[str, bytes, str]] = []

    def minute(self) -> int:
        return int((time.monotonic() - self.start_s) // 60)

    async def run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        timeout = httpx.Timeout(self.args.request_timeout_s, connect=10)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits, timeout=timeout) as c:
            self.model = (await c.get("/v1/models")).json()["data"][0]["id"]
            self.bad = bad_requests(self.model)
            tasks = [asyncio.create_task(self.worker(c)) for _ in range(self.args.concurrency)]
            tasks += [
                asyncio.create_task(loop(c))
                for loop in (self.bursts, self.bad_worker, self.sampler)
            ]
            await asyncio.gather(*tasks)
            return await self.verdict(c)

    async def worker(self, c: httpx.AsyncClient) -> None:
        while time.monotonic() < self.deadline_s:
            await self.one(c)

    async def bursts(self, c: httpx.AsyncClient) -> None:
        running: list[asyncio.Task] = []
        while time.monotonic() + self.args.burst_every_s < self.deadline_s:
            await asyncio.sleep(self.args.burst_every_s)
            running += [asyncio.create_task(self.one(c)) for _ in range(self.args.burst_size)]
        await asyncio.gather(*running)

    async def bad_worker(self, c: httpx.AsyncClient) -> None:
        """Bad requests on a fixed cadence: the odd-but-valid ones queue like any other."""
        running: list[asyncio.Task] = []
        while time.monotonic() < self.deadline_s:
            stats = self.minutes[self.minute()]
            running.append(asyncio.create_task(self.bad_request(c, stats)))
            await asyncio.sleep(self.args.bad_every_s)
        await asyncio.gather(*running)

    async def sampler(self, c: httpx.AsyncClient) -> None:
        """Samples the server; at each new minute, prints the last one's figures so far."""
        shown = 0
        while time.monotonic() < self.deadline_s:
            with contextlib.suppress(httpx.HTTPError):
                self.samples[self.minute()] = await self.sample(c)
            if self.minute() > shown:
                print_row(self.minutes[shown].row(shown, self.samples.get(shown, {})), sys.stderr)
                shown = self.minute()
            await asyncio.sleep(self.args.sample_s)

    async def sample(self, c: httpx.AsyncClient) -> dict[str, float]:
        text = (await c.get("/metrics")).text
        out = {
            key: _metric(text, name)
            for key, name in (
                ("device_pages", 'tfjax_kv_pages_used{tier="device"}'),
                ("host_pages", 'tfjax_kv_pages_used{tier="host"}'),
                ("waiting", "tfjax_num_requests_waiting"),
                ("running", "tfjax_num_requests_running"),
                ("preemptions", "tfjax_preemptions_total"),
            )
        }
        if self.pid is not None:
            out["rss_mib"] = _rss_bytes(self.pid) / 2**20
            out["open_fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return out

    async def one(self, c: httpx.AsyncClient) -> None:
        stats = self.minutes[self.minute()]
        stats.requests += 1
        words = self.rng.randrange(4, self.args.max_prompt_words)
        body = {
            "model": self.model,
            "prompt": " ".join(self.rng.choice(WORDS) for _ in range(words)),
            "max_tokens": self.rng.randrange(4, self.args.max_output_tokens),
            "stream": True,
            "ignore_eos": True,
            "consumption_rate": self.rng.choice([5.0, 10.0, 20.0, 40.0]),
        }
        if self.rng.random() < 0.3:
            body.update(temperature=0.8, seed=self.rng.randrange(2**31))
        hangup = self.rng.randrange(0, 8) if self.rng.random() < self.args.hangup_share else None
        start = time.monotonic()
        try:
            await self.stream(c, body, stats, start, hangup)
        except (httpx.HTTPError, TimeoutError) as err:
            stats.error(f"{type(err).__name__}: {err}")
            await asyncio.sleep(0.5)  # a dead server must not turn the workers into a busy loop

    async def stream(
        self, c: httpx.AsyncClient, body: dict, stats: Minute, start: float, hangup: int | None
    ) -> None:
        async with c.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code == 429:
                stats.rejected_429 += 1  # the queue is full: a correct answer under overload
                await response.aread()
                return
            if response.status_code != 200:
                stats.error(f"{response.status_code}: {await response.aread()!r}")
                return
            events, first = 0, None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    stats.error(str(event["error"]))
                    return
                events += 1
                if first is None and event["choices"] and event["choices"][0].get("text"):
                    first = time.monotonic() - start
                    stats.ttft_s.append(first)
                if hangup is not None and events >= hangup:
                    stats.hangups += 1
                    return  # leaving the block closes the connection mid-stream
            else:
                stats.error("stream ended without [DONE]")
                return
            stats.ok += 1

    async def bad_request(self, c: httpx.AsyncClient, stats: Minute) -> None:
        path, body, expect = self.rng.choice(self.bad)
        try:
            response = await c.post(
                path, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as err:
            stats.error(f"bad request dropped: {type(err).__name__}")
            return
        code = response.status_code
        if code >= 500:
            stats.error(f"bad request got {code}: {response.text[:120]}")
        elif (expect == "ok" and code == 200) or (expect == "4xx" and 400 <= code < 500):
            stats.bad_answered_right += 1
        else:
            stats.bad_answered_wrong += 1
            stats.error_samples.append(f"bad request {body[:60]!r} got {code}")

    async def verdict(self, c: httpx.AsyncClient) -> dict[str, Any]:
        """Wait for the server to go idle, then look for leaks."""
        idle = None
        for _ in range(int(self.args.idle_timeout_s / 0.5)):
            idle = await self.sample(c)
            if idle["waiting"] == idle["running"] == idle["device_pages"] == 0:
                break
            await asyncio.sleep(0.5)
        deep = await c.get("/health", params={"deep": 1})
        rows = [m.row(i, self.samples.get(i, {})) for i, m in sorted(self.minutes.items())]
        problems = []
        if idle["device_pages"] or idle["host_pages"]:
            problems.append(f"pages still in use when idle: {idle}")
        if deep.status_code != 200:
            problems.append(f"/health?deep=1 answered {deep.status_code}: {deep.text}")
        if self.pid is not None and self.samples:
            base = self.samples.get(1) or self.samples[min(self.samples)]
            if idle["open_fds"] > base["open_fds"] + FD_SLACK:
                problems.append(f"open fds {base['open_fds']:.0f} -> {idle['open_fds']:.0f}")
            if idle["rss_mib"] > base["rss_mib"] * (1 + RSS_SLACK):
                problems.append(f"RSS {base['rss_mib']:.0f} -> {idle['rss_mib']:.0f} MiB")
        errors = sum(m.errors + m.bad_answered_wrong for m in self.minutes.values())
        if errors:
            problems.append(f"{errors} requests failed or were answered wrong")
        return {"minutes": rows, "idle": idle, "problems": problems, "ok": not problems}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_row(row: dict[str, Any], file: Any = sys.stdout) -> None:
    def fmt(key: str, spec: str = ".0f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    print(
        f"min {row['minute']:>3} | req {row['requests']:>5} ok {row['ok']:>5} "
        f"err {row['errors']:>3} hangup {row['hangups']:>4} 429 {row['rejected_429']:>4} "
        f"bad ok/wrong {row['bad_ok']}/{row['bad_wrong']} | ttft p50 {fmt('p50_ttft_ms')} "
        f"p99 {fmt('p99_ttft_ms')} ms | pages dev {fmt('device_pages')} host "
        f"{fmt('host_pages')} | rss {fmt('rss_mib')} MiB fds {fmt('open_fds')}",
        file=file,
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfjax bench soak", description=__doc__, formatter_class=HelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true", help="start `tfjax serve` here")
    parser.add_argument("--model", default="default", help="with --start-server")
    parser.add_argument("--server-args", default="", help="more `tfjax serve` flags, one string")
    parser.add_argument("--pid", type=int, default=None, help="the --base-url server's PID")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8, help="steady workers")
    parser.add_argument("--burst-size", type=int, default=16)
    parser.add_argument("--burst-every-s", type=float, default=30.0)
    parser.add_argument("--hangup-share", type=float, default=0.15)
    parser.add_argument("--bad-every-s", type=float, default=0.5)
    parser.add_argument("--max-prompt-words", type=int, default=100)
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--idle-timeout-s", type=float, default=120.0)
    parser.add_argument("--start-timeout-s", type=float, default=1800.0, help="compiles first")
    parser.add_argument("--server-log", default="soak-server.log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the rows and verdict here (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.start_server:
            flags = ["--model", args.model, *shlex.split(args.server_args)]
            log, timeout_s = Path(args.server_log), args.start_timeout_s
            server = stack.enter_context(tfjax_server(None, flags, log, timeout_s))
            url, pid = server.base_url, server.pid
        else:
            url, pid = args.base_url.rstrip("/"), args.pid
        print(f"soaking {url} for {args.minutes} min", file=sys.stderr, flush=True)
        soak = Soak(args, url, pid)
        result = asyncio.run(soak.run())
    for row in result["minutes"]:
        print_row(row)
    print(f"idle: {result['idle']}")
    print("verdict:", "ok" if result["ok"] else "; ".join(result["problems"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **result}, indent=2))
    return 0 if result["ok"] else 1
