"""Load a llama.cpp GGUF file (llama or qwen2 architecture, any quantization gguf-py reads).

Tensors are dequantized to float32 with `gguf.quants.dequantize` (Q4_1, Q8_0, F16, ... all come
back as [out, in] arrays, HF's orientation), then cast to the target dtype and transposed to
[in, out]. llama.cpp's converter permutes the rows of Llama q/k projections so its rotary code can
rotate adjacent pairs (`permute` in convert_hf_to_gguf.py); our RoPE rotates halves like HF, so
`_unpermute` inverts that. Qwen2 files are written without the permutation and are read as is.
A file without `output.weight` has tied embeddings.

With `keep_blocks` (`--quantization gguf`), Q8_0 and Q4_1 tensors are not dequantized: their
blocks are unpacked into the quantized types of `models.quant` (int8 values with per-block
scales; 4-bit values with per-block float16 scale and minimum), which the same unpermute and
transpose apply to leaf by leaf, since a block spans 32 inputs of one output row.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from models.config import ModelConfig
from models.errors import ModelLoadError
from models.loaders import check_shapes
from models.quant import GGUF_BLOCK, AffineBlocks, Weight
from models.weights import Layer, Weights


def open_reader(path: Path) -> gguf.GGUFReader:
    """A GGUFReader for `path`, with a one-line ModelLoadError for a missing or damaged file."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # gguf-py raises ValueError, struct.error, ... for bad files
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None


def load(
    reader: gguf.GGUFReader, path: Path, *, dtype: str, keep_blocks: bool = False
) -> tuple[ModelConfig, Weights]:
    """Config and numpy weights (in `dtype`) of the GGUF file `path` open in `reader`;
    with `keep_blocks`, Q8_0 / Q4_1 linear weights and embeddings stay quantized.

    The caller opens the reader (`open_reader`) because parsing the metadata takes seconds and
    the tokenizer is built from the same reader.
    """
    cfg = ModelConfig.from_gguf(reader, dtype=dtype)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    target = jnp.dtype(dtype)
    permuted = cfg.architecture == "llama"

    def find(name: str) -> gguf.ReaderTensor:
        if name not in tensors:
            raise ModelLoadError(f"tensor {name} is missing from {path}")
        return tensors[name]

    def tensor(name: str) -> np.ndarray:
        t = find(name)
        try:
            return gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise ModelLoadError(f"{path}: cannot dequantize {name}: {err}") from None

    def weight(name: str) -> Weight:
        """A 2-D weight as stored ([out, in]; [V, D] for the embedding): kept as blocks when
        asked and its type allows, else float in `dtype`."""
        t = find(name)
        if keep_blocks and t.tensor_type in BLOCK_READERS:
            reader = BLOCK_READERS[t.tensor_type]
            rows = int(t.shape[-1])  # gguf-py lists dims innermost first: [in, out]
            return reader.read(np.asarray(t.data).reshape(rows, -1, reader.nbytes), target)
        return tensor(name).astype(target)

    def linear(name: str, num_heads: int | None = None) -> Weight:
        w = weight(name)
        if permuted and num_heads is not None:
            w = jax.tree.map(lambda a: _unpermute(a, num_heads), w)
        return jax.tree.map(lambda a: np.ascontiguousarray(a.T), w)

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
        embed=weight("token_embd.weight"),
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


class _Q8_0:
    """Block: float16 scale d, 32 int8 values; value = d * q."""

    nbytes = 2 + GGUF_BLOCK

    @staticmethod
    def read(blocks: np.ndarray, dtype: np.dtype) -> qwix.QArray:
        """[out, in] int8 values, [out, in / 32] scales in `dtype` (exact for float32)."""
        d = blocks[..., :2].copy().view(np.float16)[..., 0]
        q = blocks[..., 2:].copy().view(np.int8).reshape(blocks.shape[0], -1)
        return qwix.QArray(q, d.astype(dtype), qtype=jnp.int8)


class _Q4_1:
    """Block: float16 scale d and minimum m, 16 bytes of 4-bit values (the low nibbles are
    values 0..15, the high ones 16..31); value = d * q + m."""

    nbytes = 4 + GGUF_BLOCK // 2

    @staticmethod
    def read(blocks: np.ndarray, dtype: np.dtype) -> AffineBlocks:
        """[out, in] values 0..15 (a byte each), [out, in / 32] float16 scales and minima,
        whatever `dtype`: they widen to float32 exactly inside the step."""
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        packed = blocks[..., 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        return AffineBlocks(q=q.reshape(blocks.shape[0], -1), scale=d, offset=m)


BLOCK_READERS = {
    gguf.GGMLQuantizationType.Q8_0: _Q8_0,
    gguf.GGMLQuantizationType.Q4_1: _Q4_1,
}
