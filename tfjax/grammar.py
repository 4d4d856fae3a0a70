"""Structured outputs: compiled grammars and the per-request matchers that mask the sampler.

A `Grammar` is a constraint compiled once per API request, by llguidance (a maintained engine
built for LLM token masks; we write no JSON-schema compiler): a JSON schema, a regular
expression, a choice among strings or a Lark grammar (forced tool calls). It rides in
`SamplingParams.grammar`, and every `Request` built from those params gets its own
`GrammarMatcher` (a copy of the compiled grammar's start state: `n` choices never share one).

Each step the runner asks the matcher of every constrained row to fill that row of a packed
bitmask (bit t of word t // 32 set: token t allowed), on the host; the jitted sampler sends
disallowed logits to -inf (`tfjax.sampling`). When the engine appends a sampled token the
matcher advances by it. Its state is therefore a function of the request's output tokens and
nothing else: preemption, swap and recompute never drop output tokens, so the matcher needs no
rollback and resumes exactly where it stood. The request stops with "stop" once the grammar
can take no further token (a closed JSON document) or the model samples EOS where the grammar
accepts it.

JSON is generated compact (no whitespace between tokens): small models otherwise spend their
token budget on blank lines, and a schema can still ask for whitespace in its `x-guidance`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import llguidance
import numpy as np

_JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
_SILENT = 0  # llguidance log level: errors come back through `get_error`, not stderr


class TokenizerSource(Protocol):
    """What a tokenizer must offer to drive grammars: its HF `tokenizers` backend."""

    backend: Any  # tokenizers.Tokenizer
    eos_token_ids: frozenset[int]


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it; built once per served model (0.4 s for
    SmolLM2's 49k tokens)."""

    def __init__(self, tokenizer: TokenizerSource) -> None:
        self.llg = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids) or None
        )
        self.num_mask_words = -(-self.llg.vocab_size // 32)

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """Output that validates against `schema`; a ValueError names what cannot compile."""
        source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        return Grammar(self, source, "JSON schema")

    def regex(self, pattern: str) -> Grammar:
        """Output that matches `pattern` whole, with ASCII `\\d` and `\\w` (see `ascii_classes`)."""
        source = llguidance.LLMatcher.grammar_from_regex(ascii_classes(pattern))
        return Grammar(self, source, f"regex {pattern}")

    def lark(self, source: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`%json {schema}` embeds a JSON schema)."""
        return Grammar(self, llguidance.LLMatcher.grammar_from_lark(source), "grammar")

    def choice(self, options: Sequence[str]) -> Grammar:
        """Exactly one of `options`, verbatim (vLLM's `guided_choice`: no JSON quotes)."""
        return self.lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))


_ASCII_CLASSES = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]"}


def ascii_classes(pattern: str) -> str:
    """`pattern` with `\\d`, `\\D`, `\\w` and `\\W` spelled as ASCII classes.

    llguidance reads them as Unicode classes (Rust's regex), so `\\d\\d` may give
    Devanagari digits; JSON-schema patterns (ECMAScript), vLLM's grammar engines and most
    users mean ASCII. Nested classes are valid in llguidance's syntax, so the same
    replacement serves inside `[...]`; an escaped backslash (`\\\\d`) is left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        pair = pattern[i : i + 2]
        if pair[:1] == "\\":
            out.append(_ASCII_CLASSES.get(pair[1:], pair))
            i += 2
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


class Grammar:
    """A grammar compiled against one tokenizer; immutable, shared by the requests it
    constrains. Compares by identity (it lives in the frozen `SamplingParams`)."""

    __slots__ = ("tokenizer", "_start")

    def __init__(self, tokenizer: GrammarTokenizer, source: str, description: str) -> None:
        self.tokenizer = tokenizer
        self._start = llguidance.LLMatcher(tokenizer.llg, source, log_level=_SILENT)
        if self._start.is_error():
            raise ValueError(f"cannot compile the {description}: {self._start.get_error()}")

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._start.deep_copy(), self.tokenizer.num_mask_words)


class GrammarMatcher:
    """One request's position in its grammar; advanced only by `advance` (engine thread)."""

    __slots__ = ("_matcher", "_words")

    def __init__(self, matcher: llguidance.LLMatcher, num_words: int) -> None:
        self._matcher = matcher
        self._words = np.empty(num_words, np.int32)  # llguidance writes exactly this width

    def fill_bitmask(self, row_W: np.ndarray) -> None:
        """Write the allowed next tokens into `row_W` (int32 words, bit t % 32 of word t // 32).
        Words beyond the tokenizer's vocabulary (the model may have padding logits) allow
        nothing."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        n = min(len(row_W), len(self._words))
        row_W[:n] = self._words[:n]
        row_W[n:] = 0

    def advance(self, token_id: int) -> bool:
        """Consume the sampled token; True once the grammar takes no further token (the
        constrained output is complete). The mask allows only tokens the grammar takes, so a
        refusal is a bug: `GrammarError`, for the engine to fail this request alone."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"grammar refused token {token_id}: {self._matcher.get_error()}")
        return self._matcher.is_stopped()


class GrammarError(RuntimeError):
    """A matcher left its grammar (see `GrammarMatcher.advance`)."""
