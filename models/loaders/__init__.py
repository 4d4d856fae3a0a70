"""Checkpoint readers: each turns a file format into `(ModelConfig, Weights)` of numpy arrays.

`safetensors.load` reads a HF checkpoint directory, `gguf.load` a llama.cpp GGUF file. Both
return host (numpy) arrays in the requested dtype, laid out as `models/weights.py` says, and
check them against `weights.abstract(cfg)` with `check_shapes` (a quantized weight by the shape
it stands for); `models.load_model` moves them to the device and caches them. Every failure a
user can cause is a one-line `ModelLoadError`.
"""

from __future__ import annotations

import jax

from models import quant
from models import weights as weights_lib
from models.config import ModelConfig
from models.errors import ModelLoadError
from models.weights import Weights


def check_shapes(cfg: ModelConfig, weights: Weights, source: str) -> None:
    """Raise ModelLoadError naming the first tensor whose shape contradicts the config."""
    expected = jax.tree_util.tree_flatten_with_path(weights_lib.abstract(cfg))[0]
    actual = jax.tree_util.tree_flatten_with_path(weights, is_leaf=quant.is_quantized)[0]
    if len(expected) != len(actual):
        raise ModelLoadError(f"{source}: found {len(actual)} tensors, expected {len(expected)}")
    for (path, spec), (_, array) in zip(expected, actual, strict=True):
        if (shape := tuple(array.shape)) != spec.shape:
            name = jax.tree_util.keystr(path)
            raise ModelLoadError(
                f"{source}: tensor {name} has shape {shape}, config implies {spec.shape}"
            )
