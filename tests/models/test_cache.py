"""`load_model` and the orbax cache of converted weights."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from models import cache, load_model
from models.errors import ModelLoadError


def test_second_load_restores_from_cache(
    tiny_llama3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    first = load_model(str(tiny_llama3_dir), dtype="float32", cache_dir=tmp_path)
    assert not first.from_cache and "converted tiny-llama3" in capsys.readouterr().err
    second = load_model(str(tiny_llama3_dir), dtype="float32", cache_dir=tmp_path)
    assert second.from_cache and "loaded cached tiny-llama3" in capsys.readouterr().err
    assert second.config == first.config
    assert jax.tree.structure(second.weights) == jax.tree.structure(first.weights)
    for a, b in zip(jax.tree.leaves(first.weights), jax.tree.leaves(second.weights), strict=True):
        np.testing.assert_array_equal(a, b)
    text = "hello world, the lazy dog"
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids


def test_cache_key_follows_source_and_dtype(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    key = cache.entry_dir(tmp_path, tiny_qwen2_dir, "float32")
    assert key == cache.entry_dir(tmp_path, tiny_qwen2_dir, "float32")
    assert key != cache.entry_dir(tmp_path, tiny_qwen2_dir, "bfloat16")
    config = tiny_qwen2_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert key != cache.entry_dir(tmp_path, tiny_qwen2_dir, "float32")
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damaged_entry_is_reconverted(
    tiny_qwen2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    load_model(str(tiny_qwen2_dir), dtype="float32", cache_dir=tmp_path)
    entry = cache.entry_dir(tmp_path, tiny_qwen2_dir, "float32")
    (entry / "config.json").write_text("{not json")
    model = load_model(str(tiny_qwen2_dir), dtype="float32", cache_dir=tmp_path)
    assert not model.from_cache and "ignoring unreadable cache entry" in capsys.readouterr().err


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
