"""ModelConfig from HF config dicts (old and v5 spellings) and its checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from models.config import ModelConfig, RopeScaling
from models.errors import ModelLoadError

LLAMA3_OLD_STYLE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
}


def test_from_hf_llama3_old_spelling() -> None:
    cfg = ModelConfig.from_hf(LLAMA3_OLD_STYLE, dtype="bfloat16")
    assert cfg.architecture == "llama" and cfg.head_dim == 64 and cfg.num_groups == 4
    assert cfg.rope_theta == 500000.0 and cfg.dtype == "bfloat16"
    assert cfg.rope_scaling == RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert not cfg.attention_bias and cfg.tie_word_embeddings


def test_from_hf_v5_rope_parameters_and_qwen2_bias() -> None:
    config = {
        **LLAMA3_OLD_STYLE,
        "architectures": ["Qwen2ForCausalLM"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }
    del config["rope_theta"], config["rope_scaling"]
    cfg = ModelConfig.from_hf(config)
    assert cfg.architecture == "qwen2" and cfg.attention_bias
    assert cfg.rope_theta == 1000000.0 and cfg.rope_scaling is None


def test_config_is_a_static_jit_argument() -> None:
    cfg = ModelConfig.from_hf(LLAMA3_OLD_STYLE)
    assert hash(cfg) == hash(ModelConfig.from_hf(LLAMA3_OLD_STYLE))
    f = jax.jit(lambda x, cfg: x * cfg.num_layers, static_argnames=("cfg",))
    assert int(f(jnp.int32(2), cfg=cfg)) == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_from_hf_refuses_what_the_decoder_cannot_run(change: dict, message: str) -> None:
    config = {k: v for k, v in {**LLAMA3_OLD_STYLE, **change}.items() if v is not None}
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf(config)
