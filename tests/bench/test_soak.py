"""`tfjax bench soak` for a few seconds against an in-process server on the fake runner: every
kind of traffic it sends gets the answer it expects, and its leak checks pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.reliability.harness import PAGE_SIZE, PacedRunner, make_engine, serve
from tfjax.bench import soak


def test_a_short_soak_passes(tmp_path: Path) -> None:
    runner = PacedRunner(num_pages=1024, page_size=PAGE_SIZE, step_s=0.002)
    engine = make_engine(runner, policy="tokenflow", max_batch_size=8)
    out = tmp_path / "soak.json"
    with serve(engine) as live:
        code = soak.main(
            [
                "--base-url", live.url, "--pid", str(os.getpid()), "--minutes", "0.1",
                "--concurrency", "4", "--burst-size", "8", "--burst-every-s", "2",
                "--bad-every-s", "0.05", "--max-prompt-words", "20", "--sample-s", "0.5",
                "--idle-timeout-s", "10", "--out", str(out),
            ]
        )  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0, result["problems"]
    (minute,) = result["minutes"]
    assert minute["ok"] > 10 and minute["hangups"] > 0 and minute["bad_ok"] > 20, minute
    assert minute["errors"] == minute["bad_wrong"] == 0, minute
    assert result["idle"]["device_pages"] == result["idle"]["host_pages"] == 0
