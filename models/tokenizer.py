"""`Tokenizer`: text <-> ids and chat templates, on `tokenizers` + jinja2 only.

Built from a HF checkpoint dir (`tokenizer.json`, plus `tokenizer_config.json` for the chat
template and special tokens and `generation_config.json` for extra EOS ids) or from GGUF
metadata. transformers is not used at run time: its GGUF path needs torch. For GGUF we rebuild
the byte-level BPE the way transformers' GGUF tokenizer does (vocabulary, merges, control tokens
as special added tokens, user-defined tokens as plain added ones, a split regex per
`tokenizer.ggml.pre`), and the tests check both agree. The chat template is rendered in a
sandboxed jinja2 environment set up like transformers' (`trim_blocks`, `lstrip_blocks`,
loop controls, a non-escaping `tojson`, `raise_exception`, `strftime_now`).

`save`/`load` round-trip a tokenizer through two files so the weight cache can skip re-reading
a GGUF's metadata, which takes seconds.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from models.config import gguf_value
from models.errors import ModelLoadError

META_FILE = "tfjax_tokenizer.json"
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex, as in transformers; others (e.g. "smollm") use GPT-2's.
GGUF_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        special_tokens: dict[str, str | None],
        eos_token_ids: frozenset[int],
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token, eos_token, ... as the template sees them
        self.eos_token_ids = eos_token_ids
        bos = special_tokens.get("bos_token")
        self.bos_token_id = backend.token_to_id(bos) if bos else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._template = _compile_template(chat_template) if chat_template else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts) per the model's template;
        `tools` (OpenAI tool objects) for templates that render them, as transformers passes."""
        if self._template is None:
            raise ModelLoadError("this model has no chat template")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **self.special_tokens,
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """From a HF checkpoint dir's tokenizer.json (+ tokenizer_config, generation_config)."""
        file = path / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(f"no tokenizer.json in {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"cannot read {file}: {err}") from None
        config = _read_json(path / "tokenizer_config.json")
        special_tokens = {
            name: _token_content(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        eos = _as_list(_read_json(path / "generation_config.json").get("eos_token_id"))
        if special_tokens["eos_token"] is not None:
            eos.append(backend.token_to_id(special_tokens["eos_token"]))
        template = config.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(
            backend,
            chat_template=template,
            special_tokens=special_tokens,
            eos_token_ids=frozenset(i for i in eos if i is not None),
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """From GGUF `tokenizer.ggml.*` metadata (byte-level BPE, `model` gpt2 only)."""
        kind = gguf_value(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"unsupported GGUF tokenizer {kind!r} (supported: gpt2 BPE)")
        tokens = gguf_value(reader, "tokenizer.ggml.tokens")
        types = gguf_value(reader, "tokenizer.ggml.token_type") or [0] * len(tokens)
        merges = gguf_value(reader, "tokenizer.ggml.merges") or []
        backend = _byte_level_bpe(tokens, types, merges, gguf_value(reader, "tokenizer.ggml.pre"))

        def token(key: str) -> str | None:
            token_id = gguf_value(reader, f"tokenizer.ggml.{key}")
            return None if token_id is None else tokens[token_id]

        eos_ids = (
            gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")
        )
        return cls(
            backend,
            chat_template=gguf_value(reader, "tokenizer.chat_template"),
            special_tokens={
                "bos_token": token("bos_token_id"),
                "eos_token": token("eos_token_id"),
                "unk_token": token("unknown_token_id"),
                "pad_token": token("padding_token_id"),
            },
            eos_token_ids=frozenset(i for i in eos_ids if i is not None),
        )

    def save(self, directory: Path) -> None:
        """Write `tokenizer.json` and our metadata file into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {
            "chat_template": self.chat_template,
            "special_tokens": self.special_tokens,
            "eos_token_ids": sorted(self.eos_token_ids),
        }
        (directory / META_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path) -> Tokenizer:
        """Read back what `save` wrote."""
        meta = json.loads((directory / META_FILE).read_text())
        return cls(
            tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")),
            chat_template=meta["chat_template"],
            special_tokens=meta["special_tokens"],
            eos_token_ids=frozenset(meta["eos_token_ids"]),
        )


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: list[str], pre: str | None
) -> tokenizers.Tokenizer:
    """Byte-level BPE from a GGUF vocabulary, built like transformers' GGUF tokenizer."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written in plain text rather than the byte alphabet is respelled byte by byte.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): i
        for i, token in enumerate(tokens)
    }
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(merge.split(" ")) for merge in merges],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    backend = tokenizers.Tokenizer(bpe)
    split = GGUF_PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel; skip it.
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types, strict=True)
        if kind == GGUF_CONTROL and set(token) <= alphabet
    ]
    backend.add_special_tokens(control)
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types, strict=True)
        if kind == GGUF_USER_DEFINED and token in vocab
    ]
    backend.add_tokens(user)
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        # Jinja's own tojson escapes HTML characters, which chat templates do not expect.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ModelLoadError(f"invalid chat template: {err}") from None


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text()) if file.is_file() else {}


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _as_list(value: int | list[int] | None) -> list[int | None]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
