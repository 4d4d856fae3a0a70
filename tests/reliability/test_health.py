"""`GET /health?deep=1` runs the engine's page-book invariant check on the engine thread: 200
while the books balance, 503 with what is wrong once they do not. A broken book also stops the
engine (its own idle check raises on its thread): fail-stop, so /health stays 503 and new
requests get 503 until a supervisor restarts the server."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.harness import completion_body, make_engine, serve, wait_until


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_deep_health_reports_a_broken_page_book_and_the_engine_stops() -> None:
    engine = make_engine()
    with serve(engine) as live:
        assert httpx.get(f"{live.url}/health?deep=1", timeout=15).json() == {"status": "ok"}
        leaked = engine.engine.kv.device.allocate(1)  # the engine is idle: its thread sleeps
        try:
            answer = httpx.get(f"{live.url}/health?deep=1", timeout=15)
            assert answer.status_code == 503 and answer.json()["status"] == "error"
            assert "allocator says 1 in use" in answer.json()["detail"], answer.text
            wait_until(lambda: not engine.is_healthy, 5, "the engine to stop")
            assert httpx.get(f"{live.url}/health", timeout=15).status_code == 503
            body = completion_body("after", 4, stream=False)
            assert httpx.post(f"{live.url}/v1/completions", json=body).status_code == 503
        finally:
            engine.engine.kv.device.free(leaked)
