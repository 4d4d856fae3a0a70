"""Screenshot of the live dashboard under a burst (PNG), for the README.

Start a server first, e.g. one that cannot hold the whole burst at once, so that requests
queue, get preempted and resume:

    tfjax serve --kv-pages 48 --max-batch-size 8 --max-model-len 512 &
    .venv/bin/python scripts/dashboard_shot.py --base-url http://127.0.0.1:8000 \\
        --out docs/dashboard.png

It sends `--requests` streaming completions at once, readers at a mix of rates, opens
/dashboard in headless Chromium (`scripts/headless_chromium.py`), waits `--after-s` seconds
into the burst, saves the page and then cancels the burst (closing its streams aborts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from pathlib import Path

import httpx
from headless_chromium import HeadlessChromium

PROMPTS = (
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a child.",
    "List five tips for learning a new language.",
    "Why is the sky blue?",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("out/dashboard.png"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--after-s", type=float, default=10.0, help="burst age at the shot")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[2.0, 4.0, 8.0, 15.0],
        help="reader consumption rates (tokens/s), assigned round robin; on a slow CPU pick "
        "rates the device can serve, e.g. 0.5,1,1.5,2",
    )
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    return parser.parse_args()


async def one_stream(c: httpx.AsyncClient, model: str, i: int, args: argparse.Namespace) -> None:
    body = {
        "model": model,
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": args.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "consumption_rate": args.rates[i % len(args.rates)],
    }
    async with c.stream("POST", "/v1/completions", json=body) as response:
        async for _ in response.aiter_lines():
            pass


def run_burst(args: argparse.Namespace, model: str, stop: threading.Event) -> None:
    """Stream every request on this thread's event loop until they end or `stop` is set."""

    async def main() -> None:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits) as c:
            tasks = [
                asyncio.create_task(one_stream(c, model, i, args)) for i in range(args.requests)
            ]
            while not stop.is_set() and not all(t.done() for t in tasks):
                await asyncio.sleep(0.1)
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def main() -> None:
    args = parse_args()
    model = httpx.get(f"{args.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    stop = threading.Event()
    burst = threading.Thread(target=run_burst, args=(args, model, stop))
    start = time.monotonic()
    burst.start()
    try:
        with HeadlessChromium(width=args.width, height=args.height) as browser:
            browser.open(f"{args.base_url}/dashboard")
            browser.wait_for("document.querySelectorAll('tr[data-request-id]').length", 60)
            time.sleep(max(0.0, args.after_s - (time.monotonic() - start)))
            png = browser.screenshot()
    finally:
        stop.set()
        burst.join(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"saved {args.out} ({len(png)} bytes)")


if __name__ == "__main__":
    main()
