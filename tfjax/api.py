"""What the serving layer sees of the engine: `EngineClient`, the stream deltas and the errors.

`serving/` depends only on this module (plus `SamplingParams` and `FinishReason` from
`tfjax.request`), so the HTTP layer can be tested against a fake client and the engine against
no HTTP at all. `tfjax.async_engine.AsyncEngine` is the real implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from tfjax.request import FinishReason, SamplingParams


class EngineError(Exception):
    """Base of the errors `EngineClient.generate` raises before streaming anything."""


class QueueFullError(EngineError):
    """The waiting queue is at `max_waiting`: reject at once (HTTP 429)."""


class PromptTooLongError(EngineError):
    """Prompt plus `max_tokens` cannot fit the model context or the KV pool (HTTP 400)."""


class EngineDeadError(EngineError):
    """The engine thread has stopped (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One output token's log-probability under the model's raw log-softmax (before bias,
    penalties, temperature and filters), with the `top` likeliest tokens as (id, logprob),
    likeliest first; `top` is as long as the request asked (`SamplingParams.logprobs`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one request since the previous delta.

    `text` never splits a UTF-8 character and never contains (part of) a stop string.
    The last delta of a stream has `finish_reason` set (and the request's stall and preemption
    figures); `error` is set when the engine failed.
    """

    text: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: FinishReason | None = None
    error: str | None = None
    stall_s: float = 0.0  # reader-model stall so far (set on the final delta)
    num_preemptions: int = 0  # times the request left the device (set on the final delta)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (final delta)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id; None: not asked


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Gauges and counters for /metrics and /health, read without locking (may be a step old)."""

    num_waiting: int = 0
    num_running: int = 0
    num_preempted: int = 0
    device_pages_used: int = 0
    device_pages_total: int = 0
    host_pages_used: int = 0
    host_pages_total: int = 0
    offload_bytes_d2h: int = 0
    offload_bytes_h2d: int = 0
    num_preemptions: int = 0
    num_compiles_after_warmup: int = 0
    num_generated_tokens: int = 0
    effective_tokens: float = 0.0
    num_steps: int = 0  # engine steps that ran
    host_copy_s: float = 0.0  # link seconds of KV copies to the host (write-through, swaps)
    prefix_cache_queries: int = 0
    prefix_cache_query_tokens: int = 0  # prompt tokens those lookups could have hit
    prefix_cache_hit_tokens: dict[str, int] = field(default_factory=dict)  # by tier
    page_size: int = 0  # tokens per KV page (0: unknown)
    num_compiled_buckets: int = 0  # step buckets and page-copy sizes compiled so far
    num_buckets: int = 0  # ... in all (0: unknown); fewer compiled: the rest still compiling
    extra: dict[str, float] = field(default_factory=dict)


class RequestState(NamedTuple):
    """One live request as the dashboard draws it (field names are its JSON keys). Times in
    seconds, rates in tokens/s. A tuple: hundreds are built per refresh, on the engine thread.
    """

    id: str
    status: str  # RequestStatus.value
    priority: int
    age_s: float  # since arrival
    consumption_rate: float
    buffer_tokens: int  # generated, not yet read by the reader model
    buffer_s: float  # until the reader wants a token that does not exist yet
    ttft_s: float | None  # None: no token yet
    tokens_generated: int
    max_tokens: int
    stall_s: float  # including a stall going on now
    preemptions: int
    device_pages: int
    host_pages: int  # pages whose host copy has completed


@dataclass(frozen=True, slots=True)
class Decision:
    """A plan that moved requests, and when (engine clock)."""

    at_s: float
    preempt: tuple[str, ...]
    resume: tuple[str, ...]
    admit: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LiveState:
    now_s: float  # engine clock when built
    policy: str
    stats: EngineStats
    last_decision: Decision | None
    requests: tuple[RequestState, ...]  # arrival order


class RequestStream(Protocol):
    """Deltas of one submitted request. Iterate it once; the last delta has `finish_reason`.
    Abandoning it does not abort the request: call `EngineClient.abort(request_id)`."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[Delta]: ...


class EngineClient(Protocol):
    """The async face of the engine, used from the asyncio event loop of the server."""

    model_name: str
    max_model_len: int

    @property
    def is_healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        consumption_rate: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        streaming: bool = True,
    ) -> RequestStream:
        """Queue a request; raises `QueueFullError`, `PromptTooLongError` or `EngineDeadError`
        at once (nothing is queued then). Must be called from the event loop thread.
        `consumption_rate=None` means the server default; `streaming=False`: the client reads
        the answer at the end (`Request.streaming`)."""
        ...

    def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored); its stream then ends with
        `FinishReason.ABORT` and its pages are freed within one engine step."""
        ...


@runtime_checkable
class LiveStateSource(Protocol):
    """An engine that can show its live requests (`AsyncEngine`; the app's /dashboard)."""

    async def live_state(self) -> LiveState | None:
        """A snapshot taken between two steps; None if the engine never made one."""
        ...
