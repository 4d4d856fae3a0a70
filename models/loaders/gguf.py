"""Load a llama.cpp GGUF file (llama or qwen2 architecture, any quantization gguf-py reads).

Tensors are dequantized to float32 with `gguf.quants.dequantize` (Q4_1, Q8_0, F16, ... all come
back as [out, in] arrays, HF's orientation), then cast to the target dtype and transposed to
[in, out]. llama.cpp's converter permutes the rows of Llama q/k projections so its rotary code can
rotate adjacent pairs (`permute` in convert_hf_to_gguf.py); our RoPE rotates halves like HF, so
`_unpermute` inverts that. Qwen2 files are written without the permutation and are read as is.
A file without `output.weight` has tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.errors import ModelLoadError
from models.loaders import check_shapes
from models.weights import Layer, Weights


def open_reader(path: Path) -> gguf.GGUFReader:
    """A GGUFReader for `path`, with a one-line ModelLoadError for a missing or damaged file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError, struct.error, ... for bad files
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None


def load(reader: gguf.GGUFReader, path: Path, *, dtype: str) -> tuple[ModelConfig, Weights]:
    """Config and numpy weights (in `dtype`) of the GGUF file `path` open in `reader`.

    The caller opens the reader (`open_reader`) because parsing the metadata takes seconds and
    the tokenizer is built from the same reader.
    """
    cfg = ModelConfig.from_gguf(reader, dtype=dtype)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    target = jnp.dtype(dtype)
    permuted = cfg.architecture == "llama"

    def tensor(name: str) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"tensor {name} is missing from {path}")
        t = tensors[name]
        try:
            return gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise ModelLoadError(f"{path}: cannot dequantize {name}: {err}") from None

    def linear(name: str, num_heads: int | None = None) -> np.ndarray:
        w = tensor(name)
        if permuted and num_heads is not None:
            w = _unpermute(w, num_heads)
        return np.ascontiguousarray(w.T, dtype=target)

    def bias(name: str, num_heads: int | None = None) -> np.ndarray | None:
        if not cfg.attention_bias:
            return None
        b = tensor(name)
        return (_unpermute(b, num_heads) if permuted and num_heads else b).astype(target)

    h, k = cfg.num_heads, cfg.num_kv_heads
    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        layers.append(
            Layer(
                attn_norm=tensor(p + "attn_norm.weight").astype(target),
                wq=linear(p + "attn_q.weight", h),
                wk=linear(p + "attn_k.weight", k),
                wv=linear(p + "attn_v.weight"),
                bq=bias(p + "attn_q.bias", h),
                bk=bias(p + "attn_k.bias", k),
                bv=bias(p + "attn_v.bias"),
                wo=linear(p + "attn_output.weight"),
                mlp_norm=tensor(p + "ffn_norm.weight").astype(target),
                w_gate=linear(p + "ffn_gate.weight"),
                w_up=linear(p + "ffn_up.weight"),
                w_down=linear(p + "ffn_down.weight"),
            )
        )
    weights = Weights(
        embed=tensor("token_embd.weight").astype(target),
        layers=layers,
        final_norm=tensor("output_norm.weight").astype(target),
        lm_head=None if cfg.tie_word_embeddings else linear("output.weight"),
    )
    check_shapes(cfg, weights, str(path))
    return cfg, weights


def _unpermute(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (Dh/2, 2) -> (2, Dh/2) back to halves."""
    rest = w_OxI.shape[1:]
    per_head = w_OxI.reshape(num_heads, w_OxI.shape[0] // num_heads // 2, 2, *rest)
    return per_head.swapaxes(1, 2).reshape(w_OxI.shape)
