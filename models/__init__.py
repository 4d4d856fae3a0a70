"""Models: `load_model(spec)` turns "default", a HF checkpoint dir or a .gguf file into weights
on the device plus a config and tokenizer.

The first load of a source converts it (read, dequantize, transpose, cast) and stores the result
in the orbax cache (`models/cache.py`); later loads restore from there. Progress and timings go
to stderr. The decoder itself is `models.llama` (`forward`, `logits`, `KVCache`, `StepInput`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import Mesh

from models import cache, default_model
from models.config import ModelConfig
from models.errors import ModelLoadError
from models.loaders import gguf as gguf_loader
from models.loaders import safetensors as safetensors_loader
from models.sharding import placement
from models.tokenizer import Tokenizer
from models.weights import Weights


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model ready to run: `weights` live on the default device in `config.dtype`."""

    name: str
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    source: Path  # the .gguf file or checkpoint directory it came from
    mesh: Mesh  # the devices the weights are sharded over (one device: no parallelism)
    from_cache: bool  # restored from the converted-weights cache rather than converted


def load_model(
    spec: str,
    *,
    dtype: str | None = None,
    cache_dir: Path | None = None,
    tensor_parallel: int = 1,
) -> LoadedModel:
    """Load "default", a HF checkpoint directory, or a path ending in .gguf.

    `dtype` defaults to float32 on CPU and bfloat16 on GPU/TPU; `cache_dir` to
    `cache.default_cache_dir()`. With `tensor_parallel` > 1, every weight goes straight from
    host memory into its sharding over a mesh of that many devices (`models.sharding`);
    otherwise onto the default device.
    Raises ModelLoadError with a one-line reason on failure.
    """
    cache_dir = cache_dir or cache.default_cache_dir()
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if spec == "default":
        source, name = default_model.default_gguf_path(cache_dir), default_model.DEFAULT_NAME
    else:
        source = Path(spec).expanduser()
        name = source.stem if source.suffix == ".gguf" else source.name
        if not source.exists():
            raise ModelLoadError(f"model path {source} does not exist")
        if not source.is_dir() and source.suffix != ".gguf":
            raise ModelLoadError(f"{source} is neither a HF checkpoint directory nor a .gguf file")

    entry = cache.entry_dir(cache_dir, source, dtype)
    start = time.perf_counter()
    restored = cache.restore(entry, tensor_parallel)
    if restored is None:
        cfg, weights, tokenizer = _convert(source, name, dtype, tensor_parallel)
        start = time.perf_counter()
        try:
            cache.save(entry, cfg, weights, tokenizer)
            _log(f"saved converted {name} to the cache in {time.perf_counter() - start:.1f} s")
        except OSError as err:  # a read-only or full cache dir costs speed next time only
            _log(f"cannot cache converted weights in {entry}: {err}")
    else:
        cfg, weights, tokenizer = restored
        _log(f"loaded cached {name} ({dtype}) in {time.perf_counter() - start:.1f} s")
    return LoadedModel(
        name=name,
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        source=source,
        mesh=mesh_of(weights),
        from_cache=restored is not None,
    )


def _convert(
    source: Path, name: str, dtype: str, tensor_parallel: int
) -> tuple[ModelConfig, Weights, Tokenizer]:
    """Read and convert `source`, with weights placed by `placement`."""
    _log(f"converting {name} ({dtype}) from {source}...")
    start = time.perf_counter()
    if source.suffix == ".gguf":
        reader = gguf_loader.open_reader(source)
        cfg, host_weights = gguf_loader.load(reader, source, dtype=dtype)
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        # Config and tokenizer errors first: they take milliseconds to find, weights minutes.
        safetensors_loader.read_config(source, dtype=dtype)
        tokenizer = Tokenizer.from_hf_dir(source)
        cfg, host_weights = safetensors_loader.load(source, dtype=dtype)
    weights = jax.device_put(host_weights, placement(cfg, tensor_parallel))
    _log(f"converted {name} in {time.perf_counter() - start:.1f} s")
    return cfg, weights, tokenizer


def mesh_of(weights: Weights) -> Mesh:
    return weights.embed.sharding.mesh


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
