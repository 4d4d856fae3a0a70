"""`tfjax serve`: build the engine, serve it over HTTP with uvicorn, stop cleanly on a signal.

Flags: the serve-specific ones are registered here; the engine's (`--policy`, `--kv-pages`,
`--page-size`, `--max-waiting`, `--host-kv-gb`, `--default-consumption-rate`, ...) come from
`tfjax.config.add_engine_arguments`, so `serve` and the benchmarks share one definition, and
`tfjax.async_engine.build_engine(args)` turns them into a warmed-up `AsyncEngine`. Both are
imported when needed, so `tfjax --help` stays fast and JAX loads only for `tfjax serve`.
`--api-key` (or `$TFJAX_API_KEY`) protects `/v1/*` and the dashboard (`serving.auth`);
`--ssl-keyfile`/`--ssl-certfile` go to uvicorn for TLS.

Multi-host (`--coordinator-address HOST:PORT --num-processes N --process-id I`, the names of
`jax.distributed.initialize`'s arguments): every process runs this command with the same model
and engine flags; `--tensor-parallel` must count every process's devices. Process 0 serves
HTTP as below, its steps broadcast to the others (`tfjax.distributed`); processes > 0 load,
warm up and then only run those steps, bind nothing and return when process 0 stops.

Start-up: bind, build the engine (weights, compiles) on a thread, then print exactly one line
to stdout, `tfjax serving MODEL on http://HOST:PORT` (https with `--ssl-certfile`), with the
bound port (so `--port 0` works); scripts and tests wait for it. Binding first lets routers
and probes see a replica that is starting rather than a refused connection: until the engine
is ready every route answers 503 (`/health` with `{"status": "starting"}`), and from the first
200 on, `/v1/models` names the served model. The engine is ready once the two largest step
buckets are compiled (tfjax/compile_plan.py); the rest compile in the background while it
serves (`--compile-all-first`: before). Everything else goes to stderr, and little of it: the model
load line, one progress bar with an ETA while the start-up buckets compile, then one line per
request; libraries log only warnings unless `--log-level debug`.

Shutdown: the first SIGTERM or SIGINT drains (`serving.app.drain`) while the server still
accepts connections, so that routers see `/health` answer 503: new generation requests get
503, running ones have `--shutdown-grace-s` to finish and are then aborted, ending with an SSE
error event and [DONE]. Then the server stops accepting connections, the engine is shut down
and the command returns 0. A second signal stops accepting at once; a second SIGINT also skips
the wait for open connections. A signal during start-up exits without waiting for the build.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from models.errors import UserError
from serving.app import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    ServedEngine,
    create_app,
    drain,
)
from serving.errors import unavailable

if TYPE_CHECKING:
    from tfjax.async_engine import AsyncEngine
    from tfjax.distributed import Cluster, Leader

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
API_KEY_ENV = "TFJAX_API_KEY"
OWN_LOGGERS = ("tfjax", "models", "serving")
NOISY_LOGGERS = ("absl", "jax", "orbax", "uvicorn")
_BACKSTOP_S = 10.0  # after the grace period, how long aborted streams get to close
_BUILD_POLL_S = 0.1  # how often start-up looks for a stop signal while the engine builds


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tfjax.config import add_engine_arguments

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (streaming SSE).",
    )
    parser.add_argument(
        "--model",
        default="default",
        help='"default" (the embedded SmolLM2-135M-Instruct), a HF checkpoint dir or a .gguf file',
    )
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="model name clients must send and /v1/models lists (default: the model's name)",
    )
    parser.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds running requests get to finish before they are aborted",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger request bodies get 413 before they are parsed",
    )
    parser.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        default=DEFAULT_STREAM_IDLE_TIMEOUT_S,
        help="drop a streaming client (abort its request) that takes no data for this long; "
        "0: never",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help="require 'Authorization: Bearer KEY' on /v1/* and the dashboard (/health and "
        f"/metrics stay open); default: ${API_KEY_ENV}, which keeps the key out of `ps`",
    )
    parser.add_argument(
        "--protect-metrics",
        action="store_true",
        help="with --api-key, require the key on /metrics too (scrapers must send it)",
    )
    parser.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key")
    parser.add_argument(
        "--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="level of tfjax's own log lines (one per request at info); debug also shows "
        "the libraries' (uvicorn, absl, orbax, jax), which are otherwise kept to warnings",
    )
    multihost = parser.add_argument_group("multi-host model parallel (jax.distributed)")
    multihost.add_argument(
        "--coordinator-address",
        default=None,
        help="HOST:PORT of process 0's coordinator, which binds there only: keep it on a "
        "private network (default: one process)",
    )
    multihost.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    multihost.add_argument("--process-id", type=int, default=0, help="this process (0 serves HTTP)")
    multihost.add_argument(
        "--worker-timeout-s",
        type=float,
        default=10.0,
        help="process 0 fails every request and exits (code 3) once a worker is silent this long",
    )
    multihost.add_argument(
        "--step-timeout-s",
        type=float,
        default=120.0,
        help="... or once a step has not completed after this long (a wedged worker)",
    )
    add_engine_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tfjax.async_engine import build_engine

    if args.api_key == "":
        raise UserError("--api-key must not be empty (leave it out to serve without a key)")
    if args.protect_metrics and args.api_key is None:
        raise UserError(f"--protect-metrics needs --api-key (or ${API_KEY_ENV})")
    library_level = configure_logging(args.log_level)
    cluster = _join_cluster(args)
    if cluster is not None and not cluster.is_leader:
        return _follow(args)
    front = _UntilReady()
    config = uvicorn.Config(
        front,
        host=args.host,
        port=args.port,
        log_config=None,  # keep the logging set up above: one format, all on stderr
        log_level=library_level,
        access_log=False,  # tfjax.requests logs one line per generation request instead
        lifespan="off",
        timeout_graceful_shutdown=max(args.shutdown_grace_s, 0.0) + _BACKSTOP_S,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
    )
    leader = None
    if cluster is not None:
        from tfjax.distributed import Leader

        leader = Leader(cluster)
    server = _Server(config, front, lambda: _lead(build_engine(args), leader), args)
    try:
        server.run()
    finally:
        if server.engine is not None:
            server.engine.shutdown()
        if leader is not None:
            leader.stop()
    if server.build_error is not None:
        raise server.build_error
    return 0


def _join_cluster(args: argparse.Namespace) -> Cluster | None:
    """Initialize `jax.distributed` for a multi-host run (None for one process), with the
    host KV tier off: its page copies are not replayed on the other processes."""
    if args.coordinator_address is None:
        if args.num_processes != 1 or args.process_id != 0:
            raise UserError("--num-processes and --process-id need --coordinator-address")
        return None
    import jax

    from tfjax.distributed import Cluster, initialize

    try:
        cluster = Cluster(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
            worker_timeout_s=args.worker_timeout_s,
            step_timeout_s=args.step_timeout_s,
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    if args.offload:
        logging.getLogger("tfjax").info("multi-host: the host KV tier is off (--no-offload)")
        args.offload = False
    initialize(cluster)
    if args.num_pages is None and jax.default_backend() != "cpu":
        raise UserError("--num-processes > 1 needs --kv-pages: every process sizes one pool")
    return cluster


def _follow(args: argparse.Namespace) -> int:
    """A process > 0: build the same runner as process 0, then run the steps it broadcasts."""
    from tfjax.async_engine import build_runner
    from tfjax.distributed import follow

    _, _, runner = build_runner(args)
    return follow(runner)


def _lead(engine: AsyncEngine, leader: Leader | None) -> AsyncEngine:
    if leader is not None:
        leader.lead(engine)
    return engine


def configure_logging(level_name: str) -> int:
    """Our loggers at `level_name`; every library's (absl and orbax while loading weights,
    jax probing for backends, uvicorn announcing itself, ...) at WARNING unless `debug`, so
    that a start prints a few lines of its own and nothing else. Returns the libraries' level.
    """
    level = getattr(logging, level_name.upper())
    library_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    logging.basicConfig(
        level=library_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # absl (imported by orbax) may already have a handler on the root logger
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name in NOISY_LOGGERS:  # these set their own levels, so the root's does not reach them
        logging.getLogger(name).setLevel(library_level)
    return library_level


class _UntilReady:
    """The ASGI app uvicorn serves: 503 on every route until `app` is set, then `app`."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            if scope["path"] == "/health":
                response = JSONResponse({"status": "starting"}, status_code=503)
            else:
                response = unavailable("The engine is starting.").response()
            await response(scope, receive, send)


class _Server(uvicorn.Server):
    """uvicorn's server with the engine built after binding, our ready line and draining."""

    def __init__(
        self,
        config: uvicorn.Config,
        front: _UntilReady,
        build: Callable[[], ServedEngine],
        args: argparse.Namespace,
    ) -> None:
        super().__init__(config)
        self.front = front  # `config.app`, which starts serving `self.app` once it is built
        self.build = build
        self.args = args
        self.grace_s = max(args.shutdown_grace_s, 0.0)
        self.engine: ServedEngine | None = None
        self.build_error: BaseException | None = None
        self.app: Starlette | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        built = await self._build_engine()
        if built is None:
            return
        self.engine = built
        args = self.args
        self.app = create_app(
            built,
            served_model_name=args.served_model_name,
            default_consumption_rate=args.default_consumption_rate,
            max_request_bytes=args.max_request_bytes,
            stream_idle_timeout_s=args.stream_idle_timeout_s or None,
            api_key=args.api_key,
            protect_metrics=args.protect_metrics,
        )
        self.front.app = self.app
        port = self.servers[0].sockets[0].getsockname()[1]
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        model_name = args.served_model_name or built.model_name
        scheme = "https" if self.config.is_ssl else "http"
        print(f"tfjax serving {model_name} on {scheme}://{host}:{port}", flush=True)

    async def _build_engine(self) -> ServedEngine | None:
        """Build the engine on a daemon thread (a signal must not wait for compiles); None if
        it failed (`build_error`) or a signal came first."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def build() -> None:
            try:
                outcome = (self.build(), None)
            except BaseException as err:  # re-raised by `run`, after uvicorn has stopped
                outcome = (None, err)
            with contextlib.suppress(RuntimeError):  # the loop is closed: start-up gave up
                loop.call_soon_threadsafe(_settle, done, *outcome)

        threading.Thread(target=build, name="tfjax-build", daemon=True).start()
        while not done.done() and not self.should_exit:
            await asyncio.wait([done], timeout=_BUILD_POLL_S)
        if not done.done():
            return None
        if done.exception() is not None:
            self.build_error = done.exception()
            self.should_exit = True
            return None
        if self.should_exit:  # stopped while building: this engine is never served
            self.engine = done.result()
            return None
        return done.result()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Replaces uvicorn's handlers, which re-raise the signal once the server has stopped
        and so would kill the process by SIGTERM instead of letting it shut the engine down and
        exit 0. Handlers run on the event loop, where draining must happen."""
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain is not None or self.app is None:
            self.should_exit = True
            self.force_exit = self.force_exit or (self._drain is not None and sig == signal.SIGINT)
            return
        self._drain = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        assert self.app is not None
        await drain(self.app, self.grace_s)
        self.should_exit = True


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
