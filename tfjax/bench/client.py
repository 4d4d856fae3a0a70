"""The streaming OpenAI client of every live benchmark: sends requests on their schedule and
records when each token arrived.

`run_requests` sends each `ClientRequest` at its arrival time (relative to the start of the run)
as `POST {base_url}{endpoint}` (`/v1/completions` by default, vLLM's `--endpoint`), streaming
with `stream_options.include_usage`, and with `consumption_rate` (our extension, when the request
declares it) and `ignore_eos` (to force the drawn output length). A request can also be
non-streaming (`stream: false`): its tokens arrive at once with the response.

Token counting: an SSE chunk counts `usage.completion_tokens` growth when the server sends usage
on every chunk (vLLM's `continuous_usage_stats`), else the length of a `token_ids` field, else
one token per chunk with text (`choices[0].text`, or `delta.content` of a chat chunk). If the
final usage reports more tokens than were counted (a server that held back bytes of a partial
character sends two tokens in one chunk), the missing tokens are added to the last chunk and
counted per request in `tokens_added_at_end`.

A failed request (HTTP error, error event, timeout, a stream without [DONE]) keeps its `error`;
`tfjax.bench.metrics` leaves it out of the latency figures, as vLLM's benchmark does. The
client's own CPU time over the run is returned with the records, so a run can show that the
client was not the bottleneck. The client is aiohttp: at 256 streams it spends a third of
httpx's CPU per chunk, about what a bare asyncio protocol does (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from tfjax.bench.workload import ClientRequest, make_prompt
from tfjax.progress import ProgressBar

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = COMPLETIONS
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


@dataclass(frozen=True, kw_only=True, slots=True)
class RunTimes:
    """How long a run took, and the CPU seconds this process spent on it meanwhile."""

    wall_s: float
    client_cpu_s: float


def request_body(cfg: ClientConfig, req: ClientRequest) -> dict[str, Any]:
    """The JSON body of `req` for `cfg.endpoint` (a chat endpoint gets the prompt as text)."""
    body: dict[str, Any] = {"model": cfg.model, "max_tokens": req.output_len, "stream": req.stream}
    if cfg.endpoint == CHAT_COMPLETIONS:
        text = make_prompt(req, mode="text", seed=cfg.seed)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = make_prompt(req, mode=cfg.prompt_mode, seed=cfg.seed)
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.extensions:
        if req.declared:
            body["consumption_rate"] = req.rate
        body["ignore_eos"] = cfg.ignore_eos
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.extra_body)
    return body


async def send_request(
    client: aiohttp.ClientSession, cfg: ClientConfig, req: ClientRequest, t0: float
) -> RequestRecord:
    """Wait for `req`'s arrival time (relative to `t0`, a perf_counter value), send it."""
    rec = RequestRecord(
        index=req.index,
        rate=req.rate,
        prompt_len=req.prompt_len,
        max_tokens=req.output_len,
        scheduled_s=req.arrival_s,
    )
    body = request_body(cfg, req)
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    rec.send_s = time.perf_counter() - t0
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            receive = _stream if req.stream else _complete
            await receive(client, cfg.base_url + cfg.endpoint, body, rec, t0)
    except TimeoutError:
        rec.error = f"timeout after {cfg.request_timeout_s} s"
    except (aiohttp.ClientError, OSError, ValueError) as err:
        rec.error = f"{type(err).__name__}: {err}"
    rec.end_s = time.perf_counter() - t0
    return rec


async def _stream(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], rec: RequestRecord, t0: float
) -> None:
    usage_tokens: int | None = None
    async with client.post(url, json=body) as resp:
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace")
            rec.error = f"HTTP {resp.status}: {text[:300]}"
            return
        done = False
        async for line in sse_lines(resp.content):
            now = time.perf_counter() - t0
            if not line.startswith(b"data:"):
                continue  # blank separators, ":" comments (keep-alive pings), other fields
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            usage_tokens = _on_chunk(json.loads(data), rec, now, usage_tokens)
    if rec.error is None and not done:
        rec.error = "stream ended without [DONE]"
    if usage_tokens is not None and usage_tokens > rec.output_tokens and rec.chunk_tokens:
        rec.tokens_added_at_end = usage_tokens - rec.output_tokens
        rec.chunk_tokens[-1] += rec.tokens_added_at_end
        rec.output_tokens = usage_tokens


def _on_chunk(
    chunk: dict[str, Any], rec: RequestRecord, now_s: float, usage_tokens: int | None
) -> int | None:
    """Record one SSE chunk in `rec`; returns the usage's completion tokens seen so far."""
    if "error" in chunk:
        rec.error = f"error event: {json.dumps(chunk['error'])[:300]}"
        return usage_tokens
    usage = chunk.get("usage") or {}
    choices = chunk.get("choices") or []
    n = _chunk_tokens(choices, usage, rec.output_tokens)
    if n:
        rec.chunk_times_s.append(now_s)
        rec.chunk_tokens.append(n)
        rec.output_tokens += n
    if usage.get("prompt_tokens") is not None:
        rec.prompt_len = int(usage["prompt_tokens"])
    for choice in choices:
        rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
    if usage.get("completion_tokens") is not None:
        return int(usage["completion_tokens"])
    return usage_tokens


async def _complete(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], rec: RequestRecord, t0: float
) -> None:
    """A non-streaming call: every token arrives with the response, as one chunk."""
    async with client.post(url, json=body) as resp:
        content = await resp.read()
    now = time.perf_counter() - t0
    if resp.status != 200:
        rec.error = f"HTTP {resp.status}: {content.decode(errors='replace')[:300]}"
        return
    answer = json.loads(content)
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


_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(body: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines as SSE ends them (LF, CRLF or CR, never inside a JSON string, so
    U+2028 or U+0085 sent raw inside an event's JSON stays in its line), read as whatever
    bytes have arrived: one wake-up per network read, not per line. A CRLF split across two
    reads gives one extra blank line, which readers skip like any separator."""
    buffer = b""
    async for data in body.iter_any():
        *lines, buffer = _SSE_LINE_END.split(buffer + data)
        for line in lines:
            yield line
    if buffer:
        yield buffer


async def run_requests(
    cfg: ClientConfig, requests: Sequence[ClientRequest], *, progress: bool = True
) -> tuple[list[RequestRecord], RunTimes]:
    """Send every request on its schedule; returns the records and the run's times.

    With `progress`, a one-line bar on stderr counts finished requests."""
    connector = aiohttp.TCPConnector(limit=0)  # no cap: `max_concurrency` is the only one
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)  # per request: send_request
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = ProgressBar("requests", verbs=("running", "ran")) if progress else None
    finished = 0

    async def one(client: aiohttp.ClientSession, req: ClientRequest, t0: float) -> RequestRecord:
        nonlocal finished
        if sem is None:
            rec = await send_request(client, cfg, req, t0)
        else:
            async with sem:
                rec = await send_request(client, cfg, req, t0)
        finished += 1
        if bar is not None:
            bar(finished, len(requests))
        return rec

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(one(client, r, t0) for r in requests))
        wall_s = time.perf_counter() - t0
    return list(records), RunTimes(wall_s=wall_s, client_cpu_s=time.process_time() - cpu0)


def served_model(base_url: str) -> str:
    """The first model `/v1/models` lists."""
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]
