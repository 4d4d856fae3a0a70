"""HTTP plumbing of the app's responses: reading a bounded body, racing work against the
client's disconnect, and an SSE response that stops when the client leaves or stops reading.

`serving.app` uses these around every generation request so that an engine request is aborted
(and its pages freed) however its response ends; see the app's module docstring.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from serving.errors import payload_too_large

logger = logging.getLogger("tfjax.requests")
T = TypeVar("T")


class EventStream(StreamingResponse):
    """An SSE response that stops as soon as the client leaves, then calls `on_close`.

    Starlette's StreamingResponse listens for `http.disconnect` only on ASGI spec < 2.4; on 2.4
    it notices a gone client at its next write, which for a request still queued in the engine
    may be minutes away.
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        on_close: Callable[[], None],
        idle_timeout_s: float | None,
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._on_close = on_close
        self._idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_give_up(message: Message) -> None:
            """uvicorn's send waits while the socket's buffers are full (flow control)."""
            with anyio.fail_after(self._idle_timeout_s):
                await send(message)

        try:
            await until_disconnected(receive, lambda: self.stream_response(send_or_give_up))
        except* OSError:  # a spec 2.4 server failing a write to a gone client
            pass
        except* TimeoutError:
            logger.warning(
                "dropped a stream whose client took no data for %s s", self._idle_timeout_s
            )
        finally:
            await self._events.aclose()
            self._on_close()


async def read_body(request: Request, limit_bytes: int) -> bytes:
    """The whole body, or a 413 once it is known to exceed `limit_bytes` (from the declared
    length before reading anything, else as the chunks arrive)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise payload_too_large(limit_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise payload_too_large(limit_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run `work` unless the client disconnects first, in which case cancel it, return None."""
    results: list[T] = []
    async with anyio.create_task_group() as tasks:

        async def run_work() -> None:
            results.append(await work())
            tasks.cancel_scope.cancel()

        tasks.start_soon(run_work)
        while (await receive())["type"] != "http.disconnect":
            pass  # the body was read already; nothing else may arrive before the disconnect
        tasks.cancel_scope.cancel()
    return results[0] if results else None
