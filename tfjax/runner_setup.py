"""Runner construction, once: load a model, size the KV pool and the context, build the `Runner`.

Every path that needs a runner goes through here: `tfjax serve` and `tfjax calibrate` (via
`tfjax.async_engine.build_runner`, from their flags) and the offline benchmarks (`tfjax bench
engine`, `prefix`, `offload`), which choose the pool and the context length their workload
needs. The sizing rule lives only here: without an explicit pool, `default_num_pages` (a share
of free device memory, a fixed pool on CPU); the context is capped by the model's positions and
by the pool, so one request always fits it and a lone request can never deadlock.

Compiling (`Runner.warmup`) stays with the caller, which knows how to show progress.
"""

from __future__ import annotations

from jax.sharding import Mesh

from models import LoadedModel, load_model
from models.cache import default_cache_dir
from models.config import ModelConfig
from models.weights import Weights
from tfjax.config import EngineConfig
from tfjax.runner import Runner, default_num_pages, enable_compilation_cache

DEFAULT_MAX_MODEL_LEN = 2048


def make_runner(
    cfg: ModelConfig,
    weights: Weights,
    config: EngineConfig,
    *,
    num_pages: int | None = None,
    max_model_len: int | None = None,
    mesh: Mesh | None = None,
) -> Runner:
    """A `Runner` over `weights` with the pool and context sized as the module docstring says;
    explicit `num_pages` / `max_model_len` win over `config`'s."""
    num_pages = num_pages or config.num_pages or default_num_pages(cfg, config)
    pool_tokens = (num_pages - 1) * config.page_size  # page 0 is padding
    wanted_len = max_model_len or config.max_model_len or DEFAULT_MAX_MODEL_LEN
    return Runner(
        cfg,
        weights,
        config,
        num_pages=num_pages,
        max_model_len=min(wanted_len, cfg.max_position_embeddings, pool_tokens),
        mesh=mesh,
    )


def load_runner(
    model_name: str,
    config: EngineConfig,
    *,
    dtype: str | None = None,
    quantization: str | None = None,
    num_pages: int | None = None,
    max_model_len: int | None = None,
) -> tuple[LoadedModel, Runner]:
    """Load `model_name` (a path, GGUF file or known name; `models.load_model`) with the
    persistent compilation cache on, and build its runner (not yet compiled)."""
    enable_compilation_cache(default_cache_dir())
    model = load_model(
        model_name,
        dtype=dtype,
        tensor_parallel=config.tensor_parallel,
        quantization=quantization,
    )
    runner = make_runner(
        model.config,
        model.weights,
        config,
        num_pages=num_pages,
        max_model_len=max_model_len,
        mesh=model.mesh,
    )
    return model, runner
