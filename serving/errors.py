"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` plus an HTTP status.

Request validation (`serving.protocol`) and the routes (`serving.app`) raise `APIError`; the
app's exception handler turns it into a JSON response before anything was streamed, and the SSE
path sends `error_payload()` as a `data:` event once the 200 has gone out. OpenAI clients map the
status code to their exception class (400 BadRequestError, 404 NotFoundError, 429
RateLimitError, 503 InternalServerError), so the status matters more than `type`.

Statuses: 400 for anything wrong with the body (including a prompt too long for the context,
code "context_length_exceeded" as OpenAI sends it), 404 for an unknown model or route, 413 for a
body above `--max-request-bytes` (decided before it is parsed), 429 when
the engine's waiting queue is full, 503 when the engine is loading, dead or shutting down.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from tfjax.api import Delta, EngineDeadError, EngineError, PromptTooLongError, QueueFullError
from tfjax.request import FinishReason

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"


class APIError(Exception):
    """An error to show the client, with the HTTP status it is answered with."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def payload(self) -> dict[str, Any]:
        return error_payload(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def error_payload(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def payload_too_large(limit_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than this server's limit of {limit_bytes} bytes.",
        code="request_too_large",
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    )


def unavailable(message: str) -> APIError:
    return APIError(503, message, type=SERVER_ERROR, code="engine_unavailable")


def from_engine_error(err: EngineError) -> APIError:
    """The answer to an error `EngineClient.submit` raised (nothing was queued)."""
    if isinstance(err, QueueFullError):
        return APIError(
            429,
            f"The server's waiting queue is full, retry later ({err}).",
            type=RATE_LIMIT,
            code="queue_full",
        )
    if isinstance(err, PromptTooLongError):
        return bad_request(str(err), param="prompt", code="context_length_exceeded")
    if isinstance(err, EngineDeadError):
        return unavailable(f"The engine has stopped ({err}).")
    return APIError(500, f"Engine error: {err}", type=SERVER_ERROR)


def from_final_delta(final: Delta | None) -> APIError | None:
    """Why a submitted request did not end with stop/length, or None if it did."""
    if final is None:
        return APIError(
            500, "The engine ended the stream without a finish reason.", type=SERVER_ERROR
        )
    if final.error is not None or final.finish_reason is FinishReason.ERROR:
        return APIError(
            500, f"Generation failed: {final.error or 'engine error'}", type=SERVER_ERROR
        )
    if final.finish_reason is FinishReason.ABORT:
        return APIError(
            503, "The request was aborted by the server.", type=SERVER_ERROR, code="aborted"
        )
    return None
