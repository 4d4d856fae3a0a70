"""A fake OpenAI-compatible server that answers in vLLM's chunk shapes, for `tfjax bench serve`.

`/v1/completions` and `/v1/chat/completions` stream `max_tokens` tokens, one per chunk, one
every `token_delay_s` after the request arrives (no model: each token is the text " tok"), as
vLLM 0.x does: `object` "text_completion" / "chat.completion.chunk", `usage: null` on content
chunks, `finish_reason` "length" on the last one, and with `stream_options.include_usage` a
final chunk with `choices: []` and the usage; a chat stream opens with a role-only delta. A
non-streaming call answers once with the usage. `/v1/models` lists `MODEL`; `/health` is 200.

In a test it runs on a thread (`running_server`); for the client-overhead measurement it runs
as its own process, so its CPU time is not the client's:
`python -m tests.bench.fake_openai --port P [--token-delay-s S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-vllm"


def _chunk(kind: str, choices: list[dict[str, Any]], usage: dict | None) -> bytes:
    body = {"id": "cmpl-1", "object": kind, "created": 0, "model": MODEL, "choices": choices}
    return f"data: {json.dumps(body | {'usage': usage})}\n\n".encode()


def _choice(chat: bool, text: str | None, finish: str | None) -> dict[str, Any]:
    if chat:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _events(body: dict[str, Any], chat: bool, delay_s: float) -> AsyncIterator[bytes]:
    start = time.monotonic()
    n = body["max_tokens"]
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield _chunk(kind, [role], None)
    for i in range(n):
        await asyncio.sleep(max(0.0, start + (i + 1) * delay_s - time.monotonic()))
        yield _chunk(kind, [_choice(chat, " tok", "length" if i == n - 1 else None)], None)
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _chunk(kind, [], _usage(body, n))
    yield b"data: [DONE]\n\n"


def _usage(body: dict[str, Any], n: int) -> dict[str, int]:
    prompt = body.get("prompt") or body["messages"][0]["content"]
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n,
        "total_tokens": prompt_tokens + n,
    }


def make_app(token_delay_s: float = 0.01) -> Starlette:
    def endpoint(chat: bool):
        async def answer(request: Request) -> Response:
            body = await request.json()
            if body.get("stream"):
                events = _events(body, chat, token_delay_s)
                return StreamingResponse(events, media_type="text/event-stream")
            await asyncio.sleep(body["max_tokens"] * token_delay_s)
            choice = _choice(chat, " tok" * body["max_tokens"], "length")
            if chat:
                choice["message"] = {"role": "assistant", "content": choice.pop("delta")["content"]}
            return JSONResponse({"choices": [choice], "usage": _usage(body, body["max_tokens"])})

        return answer

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/v1/completions", endpoint(chat=False), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(chat=True), methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


@contextmanager
def running_server(token_delay_s: float = 0.01) -> Iterator[str]:
    """The fake on a thread, on a free loopback port; yields its base URL."""
    with serving_app(make_app(token_delay_s)) as base_url:
        yield base_url


@contextmanager
def serving_app(app: Starlette) -> Iterator[str]:
    """`app` served by uvicorn on a thread, on a free loopback port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # log_config None: no logging handler keeps the sys.stderr of the test that started it.
    config = uvicorn.Config(app, log_level="warning", lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay-s", type=float, default=0.01)
    args = parser.parse_args()
    app = make_app(args.token_delay_s)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", backlog=4096)


if __name__ == "__main__":
    main()
