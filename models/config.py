"""`ModelConfig`: the static description of one decoder (Llama 2/3, SmolLM2, Qwen2/2.5).

The config is frozen and hashable so that `jax.jit` can take it as a static argument: every
shape in the model derives from it, and two equal configs share compiled code. It is built
either from a HF `config.json` dict (`from_hf`) or from GGUF metadata (`from_gguf`); anything
those describe that `models/llama.py` does not implement (another architecture, MLP bias,
sliding windows, a rope type other than llama3) is refused here with a `ModelLoadError`, so a
model never loads into a decoder that would compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf

from models.errors import ModelLoadError

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}  # for a config.json without architectures
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "fp8", "w8a8", "gguf")  # `models.quant`'s modes, named for the CLI
QUANTIZATION_HELP = (
    "keep the weights quantized on the device: int8 (weight-only, per output channel, "
    "dequantized in the step), fp8 (the same with float8_e4m3fn values), w8a8 (int8 weights, "
    "activations quantized per token for an "
    "int8 x int8 dot), gguf (a .gguf file's Q8_0 / Q4_1 blocks as stored)"
)


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (HF `rope_type: "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyperparameters of one decoder; `dtype` is the compute and weight dtype name."""

    architecture: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.architecture not in HF_ARCHITECTURES.values():
            raise ModelLoadError(f"unsupported architecture {self.architecture!r}")
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {self.dtype!r} (supported: {DTYPES})")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")
        for name in (*sizes, "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: num_heads {self.num_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim {self.head_dim} must be even for RoPE")

    @property
    def num_groups(self) -> int:
        """G: query heads sharing one KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, config: dict[str, Any], *, dtype: str = "float32") -> ModelConfig:
        """From a HF `config.json` dict (`rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        names = config.get("architectures") or [str(config.get("model_type"))]
        architecture = HF_ARCHITECTURES.get(names[0]) or HF_MODEL_TYPES.get(names[0])
        if architecture is None:
            raise ModelLoadError(
                f"unsupported architecture {names[0]} (supported: {', '.join(HF_ARCHITECTURES)})"
            )
        if config.get("mlp_bias"):
            raise ModelLoadError("unsupported model config: mlp_bias is true")
        if config.get("use_sliding_window"):
            raise ModelLoadError("unsupported model config: use_sliding_window is true")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        try:
            num_heads = config["num_attention_heads"]
            return cls(
                architecture=architecture,
                vocab_size=config["vocab_size"],
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=config.get("num_key_value_heads") or num_heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
                rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                rope_scaling=_hf_rope_scaling(rope),
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                tie_word_embeddings=config.get("tie_word_embeddings", False),
                # Qwen2's q/k/v projections always have a bias; Llama's only when it says so.
                attention_bias=architecture == "qwen2" or config.get("attention_bias", False),
                dtype=dtype,
            )
        except KeyError as err:
            raise ModelLoadError(f"model config lacks {err.args[0]!r}") from None

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, *, dtype: str = "float32") -> ModelConfig:
        """From GGUF metadata (`general.architecture` llama or qwen2, `<arch>.*` keys)."""
        arch = gguf_value(reader, "general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ModelLoadError(
                f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)"
            )
        tensor_names = {tensor.name for tensor in reader.tensors}
        if "rope_freqs.weight" in tensor_names:
            raise ModelLoadError(
                "GGUF files with Llama 3.1 rope_freqs are not supported; use the HF checkpoint"
            )

        def key(name: str, default: Any = None) -> Any:
            value = gguf_value(reader, f"{arch}.{name}", default)
            if value is None:
                raise ModelLoadError(f"GGUF metadata lacks {arch}.{name}")
            return value

        hidden_size = key("embedding_length")
        num_heads = key("attention.head_count")
        return cls(
            architecture=arch,
            vocab_size=key("vocab_size", len(gguf_value(reader, "tokenizer.ggml.tokens", []))),
            hidden_size=hidden_size,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=num_heads,
            num_kv_heads=key("attention.head_count_kv", num_heads),
            head_dim=key("attention.key_length", hidden_size // num_heads),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            max_position_embeddings=key("context_length"),
            # llama.cpp writes `output.weight` only when it differs from the embedding.
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            dtype=dtype,
        )


def _hf_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ModelLoadError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def gguf_value(reader: gguf.GGUFReader, name: str, default: Any = None) -> Any:
    """A scalar, string or array metadata value as a Python object (`default` if absent)."""
    field = reader.get_field(name)
    return default if field is None else field.contents()
