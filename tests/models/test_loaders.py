"""Checkpoint readers: what they read, and one clear ModelLoadError for each way to fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.errors import ModelLoadError
from models.loaders import gguf as gguf_loader
from models.loaders import safetensors as safetensors_loader
from models.sharding import placement


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def test_sharded_checkpoint_is_read_through_its_index(tiny_llama3_dir: Path) -> None:
    index = json.loads((tiny_llama3_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # the fixture really is sharded
    cfg, weights = safetensors_loader.load(tiny_llama3_dir, dtype="float32")
    assert cfg.rope_scaling is not None and weights.lm_head is not None
    shard = tiny_llama3_dir / index["weight_map"]["model.layers.1.self_attn.q_proj.weight"]
    hf_q = load_file(shard)["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(weights.layers[1].wq, hf_q.T)  # stored [in, out]


def test_bfloat16_conversion(tiny_qwen2_dir: Path) -> None:
    cfg, weights = safetensors_loader.load(tiny_qwen2_dir, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and weights.embed.dtype.name == "bfloat16"
    assert weights.lm_head is None and weights.layers[0].bq is not None


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        safetensors_loader.load(tmp_path / "nope", dtype="float32")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        safetensors_loader.load(tmp_path, dtype="float32")


def test_unsupported_architecture(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_qwen2_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture GPTNeoXForCausalLM"):
        safetensors_loader.load(directory, dtype="float32")


def test_corrupt_safetensors_names_the_file(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_qwen2_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors header")
    with pytest.raises(ModelLoadError, match=r"corrupt safetensors file .*model\.safetensors"):
        safetensors_loader.load(directory, dtype="float32")


def test_truncated_safetensors(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_qwen2_dir, tmp_path)
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt safetensors file"):
        safetensors_loader.load(directory, dtype="float32")


def test_missing_shard(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_llama3_dir, tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shard.name} .* is missing"):
        safetensors_loader.load(directory, dtype="float32")


def test_missing_tensor(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    directory = _copy(tiny_qwen2_dir, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.up_proj.weight is missing"):
        safetensors_loader.load(directory, dtype="float32")


def test_gguf_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        gguf_loader.open_reader(tmp_path / "model.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        gguf_loader.open_reader(tmp_path / "bad.gguf")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """convert_hf_to_gguf.py's `permute`, written out, then undone."""
    num_heads, head_dim, width = 3, 8, 5
    w = np.arange(num_heads * head_dim * width, dtype=np.float32).reshape(-1, width)
    permuted = (
        w.reshape(num_heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(w.shape)
    )  # llama.cpp
    np.testing.assert_array_equal(gguf_loader._unpermute(permuted, num_heads), w)


def test_a_stored_tensor_reads_any_slice_in_the_models_layout(tiny_llama3_dir: Path) -> None:
    """What a device's callback reads: a slice of a linear weight transposed to [in, out] (read
    as the stored [out, in] slice), and of a norm scale, equal the slices of the whole."""
    cfg, whole = safetensors_loader.load(tiny_llama3_dir, dtype="float32")
    stored = safetensors_loader.stored_weights(tiny_llama3_dir, cfg)
    wq = stored.layers[1].wq
    assert wq.transposed and wq.shape == whole.layers[1].wq.shape
    index = (slice(None), slice(16, 48))  # a column-parallel shard: output columns 16-47
    np.testing.assert_array_equal(wq.read(index), whole.layers[1].wq[index])
    index = (slice(8, 40), slice(None))  # a row-parallel shard: input rows 8-39
    np.testing.assert_array_equal(wq.read(index), whole.layers[1].wq[index])
    norm = stored.layers[0].attn_norm
    np.testing.assert_array_equal(norm.read((slice(4, 12),)), whole.layers[0].attn_norm[4:12])


def test_load_sharded_puts_the_same_weights_on_the_device(tiny_qwen2_dir: Path) -> None:
    """One device: `load_sharded` (what `tfjax serve` loads a checkpoint with) gives the very
    arrays `load` reads, biases and tied embedding included, in bfloat16."""
    cfg, whole = safetensors_loader.load(tiny_qwen2_dir, dtype="bfloat16")
    on_device = safetensors_loader.load_sharded(tiny_qwen2_dir, cfg, placement(cfg, 1))
    pairs = zip(jax.tree.leaves(whole), jax.tree.leaves(on_device), strict=True)
    for host, device in pairs:
        assert device.dtype == host.dtype
        np.testing.assert_array_equal(np.asarray(device), host)
