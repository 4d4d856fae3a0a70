"""Load a HF checkpoint directory: `config.json` plus one or several `*.safetensors` shards.

Shards are found through `model.safetensors.index.json` when present, else `model.safetensors`,
else every `*.safetensors` in the directory. Tensors are read with `safetensors.safe_open` in
numpy (bf16 arrives as `ml_dtypes.bfloat16`), cast to the target dtype and renamed from HF's
`model.layers.{i}.self_attn.q_proj.weight` style; linear weights are transposed to [in, out].
A tied model's `lm_head.weight`, if a checkpoint still stores it, is ignored.

`load` reads every tensor into host memory; `load_sharded` reads each device's slice of each
tensor straight into that device (`jax.make_array_from_callback`), so a process reads only
what its own devices hold: under `jax.distributed` each host reads its shards of the model,
and no host ever holds the whole of it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding
from safetensors import safe_open

from models.config import ModelConfig
from models.errors import ModelLoadError
from models.loaders import check_shapes
from models.weights import Layer, Weights


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """A checkpoint tensor not read yet, in the model's layout: a linear weight (stored
    [out, in]) is `transposed` to [in, out]. `read` casts to `dtype` what it reads."""

    handle: safe_open
    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    transposed: bool

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """All of it, or the slice `index` (in the model's layout) only."""
        try:
            if index is None:
                array = self.handle.get_tensor(self.name)
            else:
                array = self.handle.get_slice(self.name)[index[::-1] if self.transposed else index]
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ModelLoadError(f"corrupt safetensors file {self.file}: {err}") from None
        return np.ascontiguousarray((array.T if self.transposed else array).astype(self.dtype))


def load(path: Path, *, dtype: str) -> tuple[ModelConfig, Weights]:
    """Config and numpy weights (in `dtype`) of the checkpoint directory `path`."""
    cfg = read_config(path, dtype=dtype)
    return cfg, jax.tree.map(StoredTensor.read, stored_weights(path, cfg))


def load_sharded(path: Path, cfg: ModelConfig, shardings: Weights) -> Weights:
    """The weights of checkpoint `path` (of config `cfg`) on the devices of `shardings` (a
    `Weights` tree of them): each addressable device's slice read into it, nothing else. A
    slice several local devices hold (a replicated weight) is read once."""

    def place(tensor: StoredTensor, sharding: Sharding) -> jax.Array:
        read = functools.cache(lambda bounds: tensor.read(tuple(slice(*b) for b in bounds)))
        return jax.make_array_from_callback(
            tensor.shape,
            sharding,
            lambda index: read(tuple((s.start, s.stop, s.step) for s in index)),
        )

    return jax.tree.map(place, stored_weights(path, cfg), shardings)


def stored_weights(path: Path, cfg: ModelConfig) -> Weights:
    """`StoredTensor`s (nothing read yet) of the checkpoint directory `path` of config `cfg`."""
    tensor = _tensor_reader(path, jnp.dtype(cfg.dtype))  # bfloat16 is ml_dtypes'

    def linear(name: str) -> StoredTensor:
        return tensor(name, transposed=True)

    def bias(name: str) -> StoredTensor | None:
        return tensor(name) if cfg.attention_bias else None

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layers.append(
            Layer(
                attn_norm=tensor(p + "input_layernorm.weight"),
                wq=linear(p + "self_attn.q_proj.weight"),
                wk=linear(p + "self_attn.k_proj.weight"),
                wv=linear(p + "self_attn.v_proj.weight"),
                bq=bias(p + "self_attn.q_proj.bias"),
                bk=bias(p + "self_attn.k_proj.bias"),
                bv=bias(p + "self_attn.v_proj.bias"),
                wo=linear(p + "self_attn.o_proj.weight"),
                mlp_norm=tensor(p + "post_attention_layernorm.weight"),
                w_gate=linear(p + "mlp.gate_proj.weight"),
                w_up=linear(p + "mlp.up_proj.weight"),
                w_down=linear(p + "mlp.down_proj.weight"),
            )
        )
    weights = Weights(
        embed=tensor("model.embed_tokens.weight"),
        layers=layers,
        final_norm=tensor("model.norm.weight"),
        lm_head=None if cfg.tie_word_embeddings else linear("lm_head.weight"),
    )
    check_shapes(cfg, weights, str(path))
    return weights


def read_config(path: Path, *, dtype: str) -> ModelConfig:
    """The ModelConfig of checkpoint dir `path` (ModelLoadError if missing or unsupported)."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a HF checkpoint: no config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {config_file}: {err}") from None
    return ModelConfig.from_hf(config, dtype=dtype)


def _shard_files(path: Path) -> dict[str, Path]:
    """Map tensor name -> shard file; an empty dict means "every file, look inside"."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"cannot read {index}: {err!r}") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise ModelLoadError(
                    f"shard {file.name} listed in {index.name} is missing in {path}"
                )
        return files
    return {}


def _tensor_reader(path: Path, dtype: np.dtype) -> Callable[..., StoredTensor]:
    """A function name -> `StoredTensor` in `dtype`, in the right shard."""
    files = _shard_files(path)
    handles: dict[Path, safe_open] = {}
    if not files:
        single = path / "model.safetensors"
        candidates = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
        if not candidates:
            raise ModelLoadError(f"no *.safetensors weights in {path}")
        for file in candidates:
            handles[file] = _open(file)
            files.update(dict.fromkeys(handles[file].keys(), file))

    def tensor(name: str, *, transposed: bool = False) -> StoredTensor:
        file = files.get(name)
        if file is None:
            raise ModelLoadError(f"tensor {name} is missing from the checkpoint in {path}")
        if file not in handles:
            handles[file] = _open(file)
        try:
            shape = tuple(handles[file].get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ModelLoadError(f"corrupt safetensors file {file}: {err}") from None
        return StoredTensor(
            handle=handles[file],
            file=file,
            name=name,
            shape=shape[::-1] if transposed else shape,
            dtype=dtype,
            transposed=transposed,
        )

    return tensor


def _open(file: Path) -> safe_open:
    try:
        return safe_open(file, framework="numpy")
    except Exception as err:  # SafetensorError, OSError: both mean this file is unusable
        raise ModelLoadError(f"corrupt safetensors file {file}: {err}") from None
