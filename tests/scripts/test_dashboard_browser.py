"""The dashboard in a real browser: headless Chromium opens /dashboard on a live server (real
engine, model-free paced runner, tokenflow), while a burst runs; rows appear with their
`data-request-id`, their numbers move between refreshes, and they leave when the requests end.
Skipped where no Chromium is installed (`.ci/run` installs Debian's `chromium`)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from headless_chromium import HeadlessChromium, find_chromium  # scripts/ is on sys.path

from tests.reliability.harness import (
    PAGE_SIZE,
    PacedRunner,
    client,
    completion_body,
    gather_bounded,
    make_engine,
    serve,
    stream_request,
)

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH")

NUM_REQUESTS = 8
NUM_TOKENS = 60  # with 40 pages of 4 tokens, about two requests fit at once: ~4 waves
ROWS = """[...document.querySelectorAll('tr[data-request-id]')].map(tr => ({
  id: tr.dataset.requestId, status: tr.dataset.status, tokens: Number(tr.dataset.tokens)}))"""


def test_rows_appear_update_and_leave() -> None:
    runner = PacedRunner(num_pages=256, page_size=PAGE_SIZE, step_s=0.02)
    engine = make_engine(runner, policy="tokenflow", num_pages=40)  # not all fit at once
    with serve(engine) as live, HeadlessChromium() as browser:
        results: list = []

        async def burst() -> None:
            async with client(live.url) as c:
                calls = [
                    stream_request(
                        c, completion_body(f"request {i}", NUM_TOKENS, consumption_rate=5 + 2 * i)
                    )
                    for i in range(NUM_REQUESTS)
                ]
                results.extend(await gather_bounded(calls, timeout_s=120))

        thread = threading.Thread(target=lambda: asyncio.run(burst()))
        thread.start()
        try:
            browser.open(f"{live.url}/dashboard")
            first = browser.wait_for(f"(rows => rows.length >= 4 && rows)({ROWS})", 20)
            ids = {row["id"] for row in first}
            assert all(i.startswith("cmpl-") for i in ids)
            updates = browser.evaluate("Number(document.body.dataset.updates)")
            # A later refresh shows more tokens for the same requests.
            later = browser.wait_for(
                f"""(rows => rows.some(r => r.tokens > 0 &&
                    r.tokens > ({json.dumps({r["id"]: r["tokens"] for r in first})}[r.id] ?? 1e9)
                ) && rows)({ROWS})""",
                20,
            )
            assert {r["status"] for r in later} <= {
                "waiting", "prefilling", "running", "preempted", "loading"
            }  # fmt: skip
            assert browser.evaluate("Number(document.body.dataset.updates)") > updates
            engine_panel = browser.evaluate("document.getElementById('policy').textContent")
            assert engine_panel == "tokenflow"
            thread.join(120)
            assert len(results) == NUM_REQUESTS and all(r.ok for r in results)
            # Every request finished: the rows leave within a refresh or two.
            browser.wait_for(f"{ROWS}.length === 0", 10)
            assert browser.evaluate("getComputedStyle(document.getElementById('empty')).display")
        finally:
            thread.join(120)
