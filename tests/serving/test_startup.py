"""What `tfjax serve` prints while it starts: one progress bar with an ETA while compiling, at
most ~10 lines on a warm start, and no library INFO chatter unless `--log-level debug`."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from tests.reliability.harness import serve_subprocess
from tfjax.progress import ProgressBar

MAX_WARM_LINES = 10
LIBRARY_CHATTER = ("absl", "orbax", "xla_bridge", "Uvicorn running", "Started server process")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_bar_is_one_line_with_an_eta() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar("step buckets", stream=out, clock=clock)
    clock.t = 10.0
    bar(1, 4)  # 10 s per bucket so far: 3 more take 30 s
    clock.t = 25.0
    bar(2, 4)  # 12.5 s per bucket: 25 s to go
    clock.t = 40.0
    bar(4, 4)
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert [f.rstrip() for f in frames] == [
        "compiling step buckets ...",
        "compiling step buckets [#####---------------] 1/4  ETA 0:30",
        "compiling step buckets [##########----------] 2/4  ETA 0:25",
        "compiled 4 step buckets in 40.0 s",
    ]
    assert len(frames[-1]) >= len(frames[-2])  # padded over the longer frame before it


def start_output(model_dir: Path, cache: Path, log: Path, *extra: str) -> list[str]:
    """Stderr lines of one `tfjax serve` start, up to its ready line."""
    args = ["--model", str(model_dir), "--max-batch-size", "2", "--max-model-len", "64",
            "--kv-pages", "16", "--prefill-token-budget", "32", *extra]  # fmt: skip
    with serve_subprocess(args, cache, log):
        pass  # ready: stop it at once
    # Bytes: text mode and splitlines() would both split at the progress bar's \r.
    return log.read_bytes().decode().split("\n")[:-1]


@pytest.mark.slow
def test_cold_and_warm_start_output(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = start_output(tiny_llama3_dir, cache, tmp_path / "cold.log")
    bars = [line for line in cold if "compiling step buckets" in line]
    assert len(bars) == 1 and "ETA" in bars[0] and "compiled" in bars[0].rsplit("\r", 1)[-1]
    assert not [line for line in cold if any(word in line for word in LIBRARY_CHATTER)], cold
    warm = start_output(tiny_llama3_dir, cache, tmp_path / "warm.log")
    assert len(warm) <= MAX_WARM_LINES, warm
    assert not [line for line in warm if any(word in line for word in LIBRARY_CHATTER)], warm
    debug = start_output(tiny_llama3_dir, cache, tmp_path / "debug.log", "--log-level", "debug")
    assert any("absl" in line or "jax" in line for line in debug)
