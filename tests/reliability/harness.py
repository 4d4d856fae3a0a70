"""What the reliability tests share: a real `Engine` + `AsyncEngine` on the model-free
`FakeRunner`, served by uvicorn on a loopback port in a thread, runners that misbehave on cue,
and a small streaming client.

Every wait here is bounded: runners that block do so with a timeout, the server thread is
joined with a timeout, and the client has per-request timeouts. Outputs are checkable: the
fake runner's tokens are a function of the prompt (`tests.fakes.reference_tokens`), and
`TextTokenizer` maps text to ids and ids to text without ambiguity, so `expected_text` is the
exact text a request must stream whatever happened to it on the way (batching, preemption,
host-tier fallbacks, neighbours disconnecting).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from serving.app import create_app
from tests.fakes import EOS, VOCAB, FakeRunner, reference_tokens
from tfjax.api import Delta
from tfjax.async_engine import AsyncEngine, Emit
from tfjax.config import EngineConfig
from tfjax.engine import Engine
from tfjax.kv.host import HostTier
from tfjax.kv.manager import Offload
from tfjax.kv.transfer import Transfers
from tfjax.request import Request
from tfjax.sched.base import Policy
from tfjax.sched.registry import make_policy

MODEL = "fake"
PAGE_SIZE = 4
BLOCK_TIMEOUT_S = 30.0  # the longest any gate in a runner holds a step


class TextTokenizer:
    """One token per character (never EOS); each token decodes to `width` copies of a letter."""

    eos_token_ids = frozenset({EOS})

    def __init__(self, width: int = 1) -> None:
        self.width = width

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(97 + i % 26) * self.width for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text


def expected_text(tokenizer: TextTokenizer, prompt: str, max_tokens: int) -> str:
    return tokenizer.decode(reference_tokens(tokenizer.encode(prompt), max_tokens))


class PacedRunner(FakeRunner):
    """A `FakeRunner` whose every prefill chunk and decode batch takes at least `step_s`.

    The time is slept, so the GIL is free meanwhile, as it is while a device computes: the
    HTTP event loop gets to run between steps as it does against the real runner.
    """

    def __init__(self, *, step_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_s = step_s
        self.num_decodes = 0

    def prefill(self, request: Request, num_tokens: int) -> np.ndarray:
        self._pace()
        return super().prefill(request, num_tokens)

    def decode(self, requests: Sequence[Request]) -> np.ndarray:
        self.num_decodes += 1
        self._pace()
        return super().decode(requests)

    def _pace(self) -> None:
        if self.step_s:
            time.sleep(self.step_s)


class FaultyRunner(PacedRunner):
    """Raises inside decode call number `fail_at` (1-based), or in every call with `always`."""

    def __init__(self, *, fail_at: int = 0, always: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_at = fail_at
        self.always = always

    def prefill(self, request: Request, num_tokens: int) -> np.ndarray:
        if self.always:
            raise RuntimeError("injected runner fault (prefill)")
        return super().prefill(request, num_tokens)

    def decode(self, requests: Sequence[Request]) -> np.ndarray:
        if self.always or self.num_decodes + 1 == self.fail_at:
            self.num_decodes += 1
            raise RuntimeError(f"injected runner fault (decode {self.num_decodes})")
        return super().decode(requests)


class GatedRunner(FaultyRunner):
    """Each step blocks until `gate` is set (at most `BLOCK_TIMEOUT_S`); `entered` tells that
    the engine thread is inside a step. Clear `gate` to hold the next step too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def _hold(self) -> None:
        self.entered.set()
        self.gate.wait(BLOCK_TIMEOUT_S)

    def prefill(self, request: Request, num_tokens: int) -> np.ndarray:
        self._hold()
        return super().prefill(request, num_tokens)

    def decode(self, requests: Sequence[Request]) -> np.ndarray:
        self._hold()
        return super().decode(requests)


class ProbedEngine(Engine):
    """An `Engine` that remembers every request it was given, when each got its first token
    and when each abort reached it (in the engine's `num_steps`)."""

    def __init__(self, *args: Any, emit: Emit, **kwargs: Any) -> None:
        def probed_emit(request_id: str, delta: Delta) -> None:
            self.on_delta(request_id, delta)
            emit(request_id, delta)

        super().__init__(*args, emit=probed_emit, **kwargs)
        self.seen: dict[str, Request] = {}  # every request ever added, in arrival order
        self.first_token_step: dict[str, int] = {}
        self.aborted_at_step: dict[str, int] = {}  # aborts of live requests only

    def add_request(self, request: Request) -> None:
        self.seen[request.request_id] = request
        super().add_request(request)

    def abort(self, request_id: str) -> None:
        if request_id in self.requests:
            self.aborted_at_step[request_id] = self.num_steps
        super().abort(request_id)

    def on_delta(self, request_id: str, delta: Delta) -> None:
        if delta.token_ids and request_id not in self.first_token_step:
            self.first_token_step[request_id] = self.num_steps


class ProbedAsyncEngine(AsyncEngine):
    """An `AsyncEngine` over a `ProbedEngine` that notes the engine's step count at each abort
    call, so tests can check an abort takes effect within one step."""

    engine: ProbedEngine

    def __init__(self, build: Callable[[Emit], ProbedEngine], **kwargs: Any) -> None:
        self.abort_called_at_step: dict[str, int] = {}
        self.abort_called_at_s: dict[str, float] = {}
        super().__init__(build, **kwargs)

    def abort(self, request_id: str) -> None:
        self.abort_called_at_step.setdefault(request_id, self.engine.num_steps)
        self.abort_called_at_s.setdefault(request_id, time.monotonic())
        super().abort(request_id)


def make_engine(
    runner: FakeRunner | None = None,
    *,
    policy: str | Policy = "fcfs-chunked",
    tokenizer: TextTokenizer | None = None,
    max_batch_size: int = 32,
    prefill_token_budget: int = 64,
    max_waiting: int = 1024,
    host_pages: int | None = 4096,
    num_pages: int | None = None,
) -> ProbedAsyncEngine:
    """A started `ProbedAsyncEngine` on `runner` (default: a fast `PacedRunner`).

    `host_pages=None` turns the host tier off; `num_pages` shrinks the device pool below the
    runner's array (the engine uses the smaller of the two)."""
    runner = runner or PacedRunner(num_pages=1024, page_size=PAGE_SIZE)
    config = EngineConfig(
        page_size=runner.page_size,
        num_pages=num_pages,
        max_batch_size=max_batch_size,
        prefill_token_budget=prefill_token_budget,
        max_waiting=max_waiting,
    )
    offload = None
    if host_pages is not None:
        offload = Offload(
            host=HostTier(host_pages, runner.page_size),
            transfers=Transfers(runner.pages_sharding, max_bytes_in_flight=1 << 20),
            io=runner,
        )
    tokenizer = tokenizer or TextTokenizer()
    return ProbedAsyncEngine(
        lambda emit: ProbedEngine(
            runner,
            tokenizer,
            config,
            make_policy(policy) if isinstance(policy, str) else policy,
            emit=emit,
            offload=offload,
        ),
        model_name=MODEL,
        tokenizer=tokenizer,
        max_waiting=max_waiting,
    )


@dataclass
class LiveServer:
    engine: ProbedAsyncEngine
    url: str
    server: uvicorn.Server

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def app_server(self) -> Any:
        """The app's route handler state (`serving.app._Server`): requests still in flight."""
        return self.server.config.app.state.server


@contextlib.contextmanager
def serve(
    engine: ProbedAsyncEngine,
    *,
    grace_s: float = 2.0,
    send_buffer_bytes: int | None = None,
    **app_options: Any,
) -> Iterator[LiveServer]:
    """Serve `engine` with uvicorn on 127.0.0.1 (a free port) in a thread; stop both on exit.

    `app_options` go to `create_app` (limits, timeouts). `send_buffer_bytes` fixes the kernel
    send buffer of every accepted connection (they inherit it from the listening socket);
    otherwise Linux grows it up to `tcp_wmem`'s 4 MiB, which a test of stalled readers would
    have to fill first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    sock.bind(("127.0.0.1", 0))
    app = create_app(engine, served_model_name=MODEL, **app_options)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=grace_s,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield LiveServer(engine, f"http://127.0.0.1:{sock.getsockname()[1]}", server)
    finally:
        server.should_exit = True
        thread.join(grace_s + 10)
        engine.shutdown()
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class StreamResult:
    """What one client saw of one request."""

    status: int
    request_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # an error body, or an SSE error event
    done: bool = False  # [DONE] arrived
    num_events: int = 0
    start_s: float = 0.0
    first_token_s: float | None = None
    end_s: float = 0.0
    events: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None

    @property
    def ended(self) -> bool:
        """The stream ended the way a client can rely on: [DONE], or an error answer."""
        return self.done or (self.status != 200 and self.error is not None)


def completion_body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        **extra,
    }


async def stream_request(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    *,
    path: str = "/v1/completions",
    disconnect_after: int | None = None,
    keep_events: bool = False,
) -> StreamResult:
    """POST `body` and read its SSE stream to the end, or close the connection after
    `disconnect_after` text events (0: right after the response headers)."""
    result = StreamResult(status=0, start_s=time.monotonic())
    async with client.stream("POST", path, json=body) as response:
        result.status = response.status_code
        if response.status_code != 200 or "text/event-stream" not in response.headers.get(
            "content-type", ""
        ):
            raw = await response.aread()
            with contextlib.suppress(ValueError):
                payload = json.loads(raw)
                result.error = payload.get("error") if response.status_code != 200 else None
                if response.status_code == 200:
                    choice = payload["choices"][0]
                    result.text = choice.get("text") or choice["message"]["content"]
                    result.finish_reason = choice["finish_reason"]
                    result.done = True
            result.end_s = time.monotonic()
            return result
        if disconnect_after == 0:
            result.end_s = time.monotonic()
            return result  # leaving the block closes the connection mid-response
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                result.done = True
                break
            event = json.loads(data)
            result.num_events += 1
            if keep_events:
                result.events.append(event)
            if "error" in event:
                result.error = event["error"]
                continue
            result.request_id = event["id"]
            choice = event["choices"][0] if event["choices"] else None
            if choice is None:
                continue
            text = choice.get("text") or choice.get("delta", {}).get("content") or ""
            if text and result.first_token_s is None:
                result.first_token_s = time.monotonic()
            result.text += text
            result.finish_reason = choice["finish_reason"] or result.finish_reason
            if disconnect_after is not None and result.num_events >= disconnect_after:
                break
    result.end_s = time.monotonic()
    return result


def client(url: str, *, timeout_s: float = 60.0) -> httpx.AsyncClient:
    """An async client without a connection cap (httpx's default of 100 would queue a burst
    on the client side instead of the server's)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits)


async def gather_bounded(coros: Sequence[Any], timeout_s: float) -> list[Any]:
    """Run all `coros` concurrently; fail the test if they are not all done in `timeout_s`."""
    return await asyncio.wait_for(asyncio.gather(*coros), timeout_s)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc/PID/statm."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.01) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


def pages_in_use(engine: AsyncEngine) -> tuple[int, int]:
    """(device, host) pages in use, read on the caller's thread (call when idle)."""
    kv = engine.engine.kv
    return kv.num_used_pages, (kv.host.num_request_pages if kv.host else 0)


READY = re.compile(r"tfjax serving (\S+) on (http://\S+)")
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serve_subprocess(
    serve_args: list[str], cache_dir: Path, log_path: Path, *, start_timeout_s: float = 300
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`tfjax serve SERVE_ARGS --port 0` in a subprocess (stderr to `log_path`); yield it and
    its base URL once it printed its ready line; kill it on exit if still alive."""
    env = dict(os.environ, TFJAX_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "serving.cli", "serve", "--port", "0", *serve_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT
        )
    try:
        lines: list[str] = []  # read on a thread, so a server that never gets ready times out
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(start_timeout_s)
        match = READY.search(lines[0] if lines else "")
        assert match, f"no ready line (exit {proc.poll()}); see {log_path}"
        yield proc, match.group(2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
