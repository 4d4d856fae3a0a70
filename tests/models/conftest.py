"""Fixtures for the model tests: strict rank promotion and the HF transformers oracle.

The tiny random checkpoints live in tests/conftest.py (the serving tests use them too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import pytest


@pytest.fixture(scope="package", autouse=True)
def _strict_rank_promotion():
    """Package-wide, so module-scoped fixtures compile under the same setting as the tests
    (the setting is part of jit's cache key)."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="session")
def hf_smollm2(default_gguf: Path) -> tuple[Any, Any]:
    """transformers' (model, tokenizer) for the default GGUF, float32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": default_gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(default_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(default_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer
