"""The OpenAI-compatible HTTP app: routes, SSE streaming, disconnect handling, draining.

`create_app(engine, ...)` wraps any `ServedEngine` (an `EngineClient` with a tokenizer); it
never builds one, so tests run it against a fake engine and `serving.serve_cmd` against the real
one. A generation request goes: decode and validate the body (`serving.protocol`), check the
model name, tokenize (chat: through the model's chat template), check the context length,
compile a structured-output constraint (`serving.constraints`), `engine.submit` (its errors
become 429/400/503 before anything is sent), then stream the deltas as SSE events or collect
them into one JSON response.

Every admitted request ends in `_Server._end`, called from a `finally` around sending its
response: it aborts the engine request unless the engine already finished it, counts the finish
reason and logs one line. The engine request is therefore aborted and its pages freed however
the response ends: a client disconnect (raced against the body by `until_disconnected`, so a
request still waiting in the queue is aborted too, not only one that is writing), a
cancellation, or a server error. It does not rely on the event generator's own `finally`, which
never runs if the client leaves before the generator is first entered.

Edges: a body above `max_request_bytes` is answered 413 as soon as its `Content-Length` (or,
for a chunked body, the bytes read so far) says so, before any parsing; `serving.protocol`
rejects absurd nesting. A streaming client that stops reading makes our writes block once the
socket buffers are full; a write blocked for `stream_idle_timeout_s` drops the client like a
disconnect (its engine request is aborted and its pages freed).

Chat streams send the role chunk together with the first delta rather than at once, so that
clients that time TTFT at the first chunk with choices (vLLM's benchmark does) measure the first
token. Text deltas each become one chunk; the finish reason comes in a chunk of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import protocol as p
from serving import rendering, responses
from serving.auth import ApiKeyAuth
from serving.calls import (
    Call,
    Choices,
    choices_failure,
    finish_name,
    is_healthy,
    text_chunk,
)
from serving.constraints import GrammarCompiler
from serving.dashboard import Dashboard
from serving.errors import (
    SERVER_ERROR,
    APIError,
    from_engine_error,
    model_not_found,
    unavailable,
)
from serving.prom import CONTENT_TYPE, Metrics, StatusCounter
from serving.tools import ToolCallStream, split_answer
from serving.transport import EventStream, read_body, until_disconnected
from tfjax.api import Delta, EngineClient, EngineError, LiveStateSource
from tfjax.request import FinishReason

logger = logging.getLogger("tfjax.requests")

_ROLE_DELTA = {"role": "assistant", "content": ""}
_CLIENT_GONE = 499  # nginx's "client closed request": only ever seen by our status counter
_DEEP_CHECK_TIMEOUT_S = 10.0  # /health?deep=1: the check waits for the current step
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # ~1M tokens of prompt ids as JSON: more than any context
DEFAULT_STREAM_IDLE_TIMEOUT_S = 60.0


class ServedEngine(EngineClient, Protocol):
    tokenizer: rendering.Tokenizer


def create_app(
    engine: ServedEngine,
    *,
    served_model_name: str | None = None,
    default_consumption_rate: float = 15.0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    stream_idle_timeout_s: float | None = DEFAULT_STREAM_IDLE_TIMEOUT_S,
    api_key: str | None = None,
    protect_metrics: bool = False,
) -> Starlette:
    """The ASGI app serving `engine` as `served_model_name` (default: `engine.model_name`).

    `default_consumption_rate` (tokens/s) is used for requests without `consumption_rate`.
    Bodies above `max_request_bytes` get 413; a stream whose client has not taken a write for
    `stream_idle_timeout_s` (None: never) is dropped. With `api_key`, `/v1/*` and the dashboard
    (and with `protect_metrics`, `/metrics`) need `Authorization: Bearer api_key`
    (`serving.auth`).
    Call `drain(app, grace_s)` on shutdown before stopping the engine.
    """
    if not default_consumption_rate > 0:
        raise ValueError(f"default_consumption_rate must be > 0, got {default_consumption_rate}")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if stream_idle_timeout_s is not None and not stream_idle_timeout_s > 0:
        raise ValueError(f"stream_idle_timeout_s must be > 0, got {stream_idle_timeout_s}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (None: no key)")
    if protect_metrics and api_key is None:
        raise ValueError("protect_metrics needs an api_key")
    server = _Server(
        engine,
        served_model_name or engine.model_name,
        default_consumption_rate,
        max_request_bytes=max_request_bytes,
        stream_idle_timeout_s=stream_idle_timeout_s,
    )
    dashboard = Dashboard(engine)
    app = Starlette(
        routes=[
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics_text, methods=["GET"]),
            Route("/get_load", server.load, methods=["GET"]),
            Route("/dashboard", dashboard.page, methods=["GET"]),
            Route("/dashboard/state", dashboard.state, methods=["GET"]),
        ],
        middleware=[
            Middleware(StatusCounter, metrics=server.metrics),  # outermost: counts 401s too
            *(
                [Middleware(ApiKeyAuth, api_key=api_key, protect_metrics=protect_metrics)]
                if api_key is not None
                else []
            ),
        ],
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.server = server
    return app


async def drain(app: Starlette, grace_s: float) -> None:
    """Refuse new generation requests (503), give running ones `grace_s` to finish, then abort
    the rest; their streams end with an error event and [DONE]."""
    await app.state.server.drain(grace_s)


class _Server:
    """Route handlers and the state they share: engine, metrics, requests in flight."""

    def __init__(
        self,
        engine: ServedEngine,
        model_name: str,
        default_rate: float,
        *,
        max_request_bytes: int,
        stream_idle_timeout_s: float | None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.default_rate = default_rate
        self.metrics = Metrics(model_name)
        self.created = int(time.time())
        self.draining = False
        self.max_request_bytes = max_request_bytes
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._live: set[str] = set()  # ids of requests submitted and not yet ended
        self.grammars = GrammarCompiler(engine.tokenizer)
        self._idle = asyncio.Event()
        self._idle.set()

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tfjax",
            "max_model_len": self.engine.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.engine.is_healthy:  # still warming up, or the engine thread has stopped
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if request.query_params.get("deep", "0").lower() in ("1", "true", "yes"):
            problem = await self._check_invariants()
            if problem is not None:
                return JSONResponse({"status": "error", "detail": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _check_invariants(self) -> str | None:
        """The engine's between-steps invariant check (page books balance, owners are live),
        if it has one. Shielded: a timed-out check is left to finish on the engine thread."""
        check = getattr(self.engine, "check_invariants", None)
        if check is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(check()), _DEEP_CHECK_TIMEOUT_S)
        except TimeoutError:
            return f"the engine did not run the invariant check within {_DEEP_CHECK_TIMEOUT_S} s"

    async def load(self, request: Request) -> Response:
        """SGLang's load endpoint, which the power-of-two policy of vllm-router and
        sglang-router polls: the requests in the engine (running, waiting or preempted)."""
        s = self.engine.stats()
        return JSONResponse({"load": s.num_running + s.num_waiting + s.num_preempted})

    async def metrics_text(self, request: Request) -> Response:
        """One engine snapshot per scrape: the live state's when the engine has one, so the
        buffer-aware series and every engine series describe the same moment."""
        source = self.engine
        state = await source.live_state() if isinstance(source, LiveStateSource) else None
        stats = state.stats if state is not None else source.stats()
        return Response(self.metrics.render(stats, state), media_type=CONTENT_TYPE)

    async def drain(self, grace_s: float) -> None:
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
        except TimeoutError:
            for request_id in list(self._live):
                self.engine.abort(request_id)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        choices = await self._admit(request, chat=chat)

        def end() -> None:
            for call in choices.calls:
                self._end(call)

        if choices.calls[0].sse:
            return EventStream(
                self._events(choices), on_close=end, idle_timeout_s=self.stream_idle_timeout_s
            )
        try:
            response = await until_disconnected(request.receive, lambda: self._collect(choices))
        finally:
            end()
        return response or Response(status_code=_CLIENT_GONE)

    async def _admit(self, request: Request, *, chat: bool) -> Choices:
        """Validate, tokenize and submit choice 0; every failure here is an `APIError` (nothing
        queued). Choice i > 0 samples with seed + i, so a seeded request is reproducible and
        its choices differ."""
        body = p.decode_body(await read_body(request, self.max_request_bytes))
        if chat:
            messages, options = p.parse_chat(body)
        else:
            prompt, options = p.parse_completion(body)
        if options.model is not None and options.model != self.model_name:
            raise model_not_found(options.model)
        if self.draining:
            raise unavailable("The server is shutting down.")
        if not self.engine.is_healthy:
            raise unavailable("The engine is not ready or has stopped.")
        tokenizer = self.engine.tokenizer
        if chat:
            prompt_ids = rendering.chat_prompt_ids(tokenizer, messages, options.tools)
        else:
            prompt_ids = rendering.completion_prompt_ids(tokenizer, prompt)
        sampling = p.sampling_params(
            options,
            num_prompt_tokens=len(prompt_ids),
            max_model_len=self.engine.max_model_len,
            default_max_tokens=None if chat else p.COMPLETIONS_DEFAULT_MAX_TOKENS,
        )
        if options.constraint is not None:
            sampling = replace(sampling, grammar=await self.grammars.compile(options.constraint))
        num_sequences = max(options.best_of, options.n)
        if num_sequences > options.n and sampling.logprobs is None:
            sampling = replace(sampling, logprobs=0)  # best_of ranks by the sampled logprobs
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        header = responses.StreamHeader(request_id, int(time.time()), self.model_name)

        def submit(index: int) -> Call:
            params = sampling
            if index and sampling.seed is not None:
                params = replace(sampling, seed=(sampling.seed + index) % p.SEED_SPACE)
            submit_s = time.monotonic()
            source = self.engine.submit(
                prompt_ids,
                params,
                consumption_rate=options.consumption_rate or self.default_rate,
                priority=options.priority,
                request_id=f"{request_id}-{index}" if index else request_id,
                streaming=options.stream,
            )
            self._live.add(source.request_id)
            self._idle.clear()
            return Call(
                header=header,
                chat=chat,
                sse=options.stream,
                include_usage=options.include_usage,
                logprobs=options.logprobs is not None,
                source=source,
                submit_s=submit_s,
                num_prompt_tokens=len(prompt_ids),
                index=index,
                tool_calls=None if options.tools is None else ToolCallStream(),
            )

        try:
            first = submit(0)
        except EngineError as err:
            raise from_engine_error(err) from None
        return Choices([first], num_sequences, submit, keep=options.n)

    async def _choice_deltas(self, choices: Choices) -> AsyncGenerator[tuple[Call, Delta], None]:
        """Every choice's deltas as they come; submits the later choices on choice 0's first
        delta. A single choice is read directly, with no queue hop per token."""
        if choices.n == 1:
            async with aclosing(self._deltas(choices.calls[0])) as deltas:
                async for delta in deltas:
                    yield choices.calls[0], delta
            return
        queue: asyncio.Queue[tuple[Call, Delta | None]] = asyncio.Queue()

        async def pump(call: Call) -> None:
            try:
                async with aclosing(self._deltas(call)) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((call, delta))
            finally:
                queue.put_nowait((call, None))

        tasks = [asyncio.create_task(pump(choices.calls[0]))]
        num_open = 1
        try:
            while num_open:
                call, delta = await queue.get()
                if delta is None:
                    num_open -= 1
                    continue
                if len(choices.calls) < choices.n and choices.error is None and is_healthy(delta):
                    added = self._submit_rest(choices)
                    tasks += [asyncio.create_task(pump(c)) for c in added]
                    num_open += len(added)
                yield call, delta
        finally:
            for task in tasks:
                task.cancel()

    def _submit_rest(self, choices: Choices) -> list[Call]:
        """Submit choices 1..n-1; a refusal (queue full, engine down) fails the request."""
        added = []
        for index in range(len(choices.calls), choices.n):
            try:
                added.append(choices.submit(index))
            except EngineError as err:
                choices.error = f"Choice {index} could not be queued: {err}"
                break
        choices.calls += added
        return added

    async def _deltas(self, call: Call) -> AsyncGenerator[Delta, None]:
        """The engine's deltas, timed and bookkept on `call`."""
        async for delta in call.source:
            if delta.token_ids or delta.text:
                self._observe_token(call)
            call.num_output_tokens = delta.num_output_tokens
            if delta.finish_reason is not None or delta.error is not None:
                call.final = delta
            yield delta

    def _end(self, call: Call) -> None:
        """Called exactly once per admitted request, after its response ended in any way."""
        if call.final is None:
            self.engine.abort(call.source.request_id)
        self._live.discard(call.source.request_id)
        if not self._live:
            self._idle.set()
        self._log_finished(call)

    def _observe_token(self, call: Call) -> None:
        now = time.monotonic()
        if call.last_token_s is None:
            call.first_token_s = now
            self.metrics.ttft.observe(now - call.submit_s)
        else:
            self.metrics.itl.observe(now - call.last_token_s)
        call.last_token_s = now

    def _log_finished(self, call: Call) -> None:
        """One line per request, with the engine's stall and preemption figures."""
        final = call.final
        if final is None:
            reason = FinishReason.ABORT.value  # the client went away or the task was cancelled
        else:
            reason = final.finish_reason.value if final.finish_reason else FinishReason.ERROR.value
        self.metrics.finished.labels(reason).inc()
        ttft_ms = (
            "-"
            if call.first_token_s is None
            else f"{(call.first_token_s - call.submit_s) * 1e3:.1f}"
        )
        logger.info(
            "%s finish=%s prompt_tokens=%d output_tokens=%d ttft_ms=%s e2e_ms=%.1f "
            "stall_ms=%.1f preemptions=%d cached_tokens=%d",
            call.header.id,
            reason,
            call.num_prompt_tokens,
            call.num_output_tokens,
            ttft_ms,
            (time.monotonic() - call.submit_s) * 1e3,
            final.stall_s * 1e3 if final else 0.0,
            final.num_preemptions if final else 0,
            final.num_cached_tokens if final else 0,
        )

    async def _events(self, choices: Choices) -> AsyncGenerator[bytes, None]:
        """SSE events of one request, [DONE] last; `EventStream` closes it. Every choice's
        finish chunk comes at the end, in index order."""
        first = choices.calls[0]
        h = first.header
        role_sent: set[int] = set()
        async with aclosing(self._choice_deltas(choices)) as deltas:
            async for call, delta in deltas:
                if call.chat and call.index not in role_sent and (delta.token_ids or delta.text):
                    role_sent.add(call.index)
                    yield responses.sse_event(
                        responses.chat_chunk(h, _ROLE_DELTA, None, index=call.index)
                    )
                text, calls = delta.text, []
                if call.tool_calls is not None:
                    text, calls = call.tool_calls.push(text)
                if text or delta.logprobs:
                    tokens = self._token_texts(delta)
                    yield responses.sse_event(text_chunk(call, text, None, tokens))
                if calls:
                    delta_calls = {"tool_calls": calls}
                    yield responses.sse_event(
                        responses.chat_chunk(h, delta_calls, None, None, call.index)
                    )
        failure = choices_failure(choices)
        if failure is not None:
            yield responses.sse_event(failure.payload())
        else:
            for call in choices.calls:
                if call.chat and call.index not in role_sent:
                    yield responses.sse_event(
                        responses.chat_chunk(h, _ROLE_DELTA, None, index=call.index)
                    )
                rest = call.tool_calls.flush() if call.tool_calls is not None else ""
                if rest:
                    yield responses.sse_event(text_chunk(call, rest, None))
                num_calls = call.tool_calls.num_calls if call.tool_calls is not None else 0
                yield responses.sse_event(text_chunk(call, "", finish_name(call, num_calls)))
            if first.include_usage:
                object_name = "chat.completion.chunk" if first.chat else "text_completion"
                usage = responses.usage([c.final for c in choices.calls])
                yield responses.sse_event(responses.usage_chunk(h, object_name, usage))
        yield responses.SSE_DONE

    async def _collect(self, choices: Choices) -> Response:
        texts: dict[int, list[str]] = {i: [] for i in range(choices.n)}
        tokens: dict[int, list[responses.TokenText]] = {i: [] for i in range(choices.n)}
        async with aclosing(self._choice_deltas(choices)) as deltas:
            async for call, delta in deltas:
                texts[call.index].append(delta.text)
                tokens[call.index].extend(self._token_texts(delta) or ())
        failure = choices_failure(choices)
        if failure is not None:
            return failure.response()
        first = choices.calls[0]
        usage = responses.usage([c.final for c in choices.calls])
        build_logprobs = responses.chat_logprobs if first.chat else responses.completion_logprobs

        def choice(i: int, call: Call) -> dict[str, Any]:
            text = "".join(texts[call.index])
            logprobs = build_logprobs(tokens[call.index]) if first.logprobs else None
            if not call.chat:
                return responses.completion_choice(i, text, finish_name(call), logprobs)
            content, calls = (text, []) if call.tool_calls is None else split_answer(text)
            reason = finish_name(call, len(calls))
            return responses.chat_choice(i, content, reason, logprobs, calls)

        kept = choices.calls
        if choices.keep < choices.n:  # best_of: the likeliest sequences, by raw logprob
            kept = sorted(kept, key=lambda c: -sum(t.logprob for t in tokens[c.index]))
        body = [choice(i, call) for i, call in enumerate(kept[: choices.keep])]
        build = responses.chat_response if first.chat else responses.completion_response
        return JSONResponse(build(first.header, body, usage))

    def _token_texts(self, delta: Delta) -> list[responses.TokenText] | None:
        """The delta's logprobs with each token as text (as vLLM: the token decoded alone)."""
        if delta.logprobs is None:
            return None
        decode = self.engine.tokenizer.decode
        return [
            responses.TokenText(
                decode([lp.token_id]), lp.logprob, tuple((decode([t]), v) for t, v in lp.top)
            )
            for lp in delta.logprobs
        ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and wrong methods (405) in the OpenAI error shape too."""
    assert isinstance(exc, HTTPException)
    return APIError(exc.status_code, str(exc.detail)).response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    return APIError(500, "Internal server error.", type=SERVER_ERROR).response()
