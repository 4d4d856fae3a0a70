"""Models: `load_model(spec)` turns "default", a HF checkpoint dir or a .gguf file into weights
on the device plus a config and tokenizer.

The first load of a source converts it (read, dequantize, transpose, cast) and stores the result
in the orbax cache (`models/cache.py`); later loads restore from there. Progress and timings go
to stderr. The decoder itself is `models.llama` (`forward`, `logits`, `KVCache`, `StepInput`).

`quantization` (`models.quant`): "int8" / "w8a8" quantize the float weights (converted or
restored from the cache) on the device, one weight at a time; "gguf" reads a GGUF file's Q8_0 /
Q4_1 blocks as they are, which is cheap, so it bypasses the cache. Quantized weights live on
one device (no tensor parallelism yet).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import cache, default_model, quant
from models.config import QUANTIZATIONS, ModelConfig
from models.errors import ModelLoadError
from models.loaders import gguf as gguf_loader
from models.loaders import safetensors as safetensors_loader
from models.sharding import make_mesh, placement
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
    quantization: str | None  # a `models.QUANTIZATIONS` mode, None for float weights
    from_cache: bool  # restored from the converted-weights cache rather than converted


def load_model(
    spec: str,
    *,
    dtype: str | None = None,
    cache_dir: Path | None = None,
    tensor_parallel: int = 1,
    quantization: str | None = None,
) -> LoadedModel:
    """Load "default", a HF checkpoint directory, or a path ending in .gguf.

    `dtype` defaults to float32 on CPU and bfloat16 on GPU/TPU; `cache_dir` to
    `cache.default_cache_dir()`. With `tensor_parallel` > 1, every weight goes straight from
    host memory into its sharding over a mesh of that many devices (`models.sharding`);
    otherwise onto the default device. `quantization` is None or one of
    `models.QUANTIZATIONS` (see the module docstring).
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
    _check_quantization(quantization, source, tensor_parallel)
    if quantization == "gguf":
        start = time.perf_counter()
        cfg, weights, tokenizer = _read_gguf_blocks(source, name, dtype)
        _log(f"loaded {name} with its GGUF blocks in {time.perf_counter() - start:.1f} s")
        return _loaded(name, cfg, weights, tokenizer, source, quantization, from_cache=False)

    entry = cache.entry_dir(cache_dir, source, dtype)
    start = time.perf_counter()
    # Several `jax.distributed` processes would each write the same entry (orbax saves are
    # collective, our temp dirs are per process): they convert from the source every start.
    use_cache = jax.process_count() == 1
    restored = cache.restore(entry, tensor_parallel) if use_cache else None
    if restored is None:
        cfg, weights, tokenizer = _convert(source, name, dtype, tensor_parallel)
        if use_cache:
            _save_converted(entry, name, cfg, weights, tokenizer)
    else:
        cfg, weights, tokenizer = restored
        _log(f"loaded cached {name} ({dtype}) in {time.perf_counter() - start:.1f} s")
    if quantization is not None:
        start = time.perf_counter()
        weights = quant.quantize(weights, quantization, _one_device(cfg))
        _log(f"quantized {name} to {quantization} in {time.perf_counter() - start:.1f} s")
    return _loaded(name, cfg, weights, tokenizer, source, quantization, restored is not None)


def _save_converted(
    entry: Path, name: str, cfg: ModelConfig, weights: Weights, tokenizer: Tokenizer
) -> None:
    start = time.perf_counter()
    try:
        cache.save(entry, cfg, weights, tokenizer)
        _log(f"saved converted {name} to the cache in {time.perf_counter() - start:.1f} s")
    except OSError as err:  # a read-only or full cache dir costs speed next time only
        _log(f"cannot cache converted weights in {entry}: {err}")


def _loaded(
    name: str,
    cfg: ModelConfig,
    weights: Weights,
    tokenizer: Tokenizer,
    source: Path,
    quantization: str | None,
    from_cache: bool,
) -> LoadedModel:
    return LoadedModel(
        name=name,
        config=cfg,
        weights=weights,
        tokenizer=tokenizer,
        source=source,
        mesh=mesh_of(weights),
        quantization=quantization,
        from_cache=from_cache,
    )


def _check_quantization(quantization: str | None, source: Path, tensor_parallel: int) -> None:
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r} (choose from {QUANTIZATIONS})")
    if quantization == "gguf" and source.suffix != ".gguf":
        raise ModelLoadError(f"--quantization gguf needs a .gguf model, not {source}")
    if tensor_parallel > 1:
        raise ModelLoadError("--quantization does not support --tensor-parallel > 1 yet")


def _read_gguf_blocks(
    source: Path, name: str, dtype: str
) -> tuple[ModelConfig, Weights, Tokenizer]:
    """A GGUF file with its Q8_0 / Q4_1 tensors kept quantized, on the default device."""
    reader = gguf_loader.open_reader(source)
    cfg, host_weights = gguf_loader.load(reader, source, dtype=dtype, keep_blocks=True)
    weights = jax.device_put(host_weights, _one_device(cfg))
    return cfg, weights, Tokenizer.from_gguf(reader)


def _one_device(cfg: ModelConfig) -> NamedSharding:
    """Where quantized weights live: the default device, as a one-device mesh's sharding."""
    return NamedSharding(make_mesh(1, cfg), PartitionSpec())


def _convert(
    source: Path, name: str, dtype: str, tensor_parallel: int
) -> tuple[ModelConfig, Weights, Tokenizer]:
    """Read and convert `source`, with weights placed by `placement`: a checkpoint
    directory's straight from the files into each device's slice, a GGUF file's whole
    through host memory."""
    _log(f"converting {name} ({dtype}) from {source}...")
    start = time.perf_counter()
    if source.suffix == ".gguf":
        reader = gguf_loader.open_reader(source)
        cfg, host_weights = gguf_loader.load(reader, source, dtype=dtype)
        tokenizer = Tokenizer.from_gguf(reader)
        weights = jax.device_put(host_weights, placement(cfg, tensor_parallel))
    else:
        # Config and tokenizer errors first: they take milliseconds to find, weights minutes.
        cfg = safetensors_loader.read_config(source, dtype=dtype)
        tokenizer = Tokenizer.from_hf_dir(source)
        weights = safetensors_loader.load_sharded(source, cfg, placement(cfg, tensor_parallel))
    _log(f"converted {name} in {time.perf_counter() - start:.1f} s")
    return cfg, weights, tokenizer


def mesh_of(weights: Weights) -> Mesh:
    return jax.tree.leaves(weights)[0].sharding.mesh


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
