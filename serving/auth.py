"""API-key protection for a replica reached over a network (`tfjax serve --api-key`).

`ApiKeyAuth` is ASGI middleware: with a key set, every `/v1/*` route and the dashboard
(`/dashboard`, `/dashboard/state`: it lists live requests) answer 401 in OpenAI's error shape
unless the request carries `Authorization: Bearer KEY`, as vLLM, SGLang and llama.cpp's server
do. `/health` and `/metrics` stay open, because routers and Prometheus scrapers probe them
without credentials, unless `protect_metrics` (`--protect-metrics`) closes `/metrics` too;
unknown paths outside `/v1/` get their 404 either way.

The key is compared with `hmac.compare_digest`, so the time an answer takes says nothing about
how much of a guess was right, and it never reaches a log line or an error message.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import APIError

_PROTECTED_PREFIXES = ("/v1/", "/dashboard")


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool = False) -> None:
        self.app = app
        self._key = api_key.encode()
        self._protect_metrics = protect_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (
            is_protected(path) or (self._protect_metrics and path == "/metrics")
        ):
            problem = self._problem(dict(scope["headers"]).get(b"authorization"))
            if problem is not None:
                await APIError(401, problem, code="invalid_api_key").response()(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        """Why `header` does not authorize the request, or None if it does."""
        if header is None:
            return "No API key provided: send it as 'Authorization: Bearer KEY'."
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
            return "Incorrect API key provided."
        return None


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith(_PROTECTED_PREFIXES)
