"""Our GGUF tokenizer (tokenizers + jinja2 only) against transformers' GGUF tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.loaders.gguf import open_reader
from models.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,   runs of them\tand\t\ttabs  ",
    "Café naïve résumé Ünïcödé façade",
    "日本語のテキスト、中文文本，한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A: pass\n",
    "numbers 1234567 3.14159 -42 1e-9",
    "<|im_start|>user\nhi<|im_end|>\n",
    "it's we'll I'M they've",
    "\n\n\r\n \n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 👋"},
        {"role": "user", "content": "2+2?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizers_pair(default_gguf: Path, hf_smollm2: tuple[Any, Any]) -> tuple[Tokenizer, Any]:
    return Tokenizer.from_gguf(open_reader(default_gguf)), hf_smollm2[1]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers_pair, text: str) -> None:
    ours, hf = tokenizers_pair
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizers_pair, messages: list[dict], add_generation_prompt: bool
) -> None:
    ours, hf = tokenizers_pair
    want = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == want


def test_special_ids_and_round_trip(tokenizers_pair, tmp_path: Path) -> None:
    ours, hf = tokenizers_pair
    assert ours.eos_token_ids == {hf.eos_token_id}
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.vocab_size == len(hf)
    assert ours.id_to_token(ours.encode("<|im_end|>")[0]) == "<|im_end|>"
    ours.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    text = TEXTS[4] + TEXTS[7]
    assert loaded.encode(text) == ours.encode(text)
    assert loaded.apply_chat_template(CONVERSATIONS[1]) == ours.apply_chat_template(
        CONVERSATIONS[1]
    )
    assert loaded.eos_token_ids == ours.eos_token_ids


def test_hf_dir_tokenizer(tiny_qwen2_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours, hf = Tokenizer.from_hf_dir(tiny_qwen2_dir), AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    text = "the quick brown fox 🦊 said hello"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.eos_token_ids == {hf.eos_token_id}
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
