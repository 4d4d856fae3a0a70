"""Structured-output options of a request body, parsed and compiled to a `tfjax.grammar.Grammar`.

Accepted on both endpoints (as vLLM does): OpenAI's `response_format` (`text`, `json_object`,
`json_schema` with `name`, `schema`, optional `strict` and `description`) and vLLM's
`guided_json` (a schema, as an object or a JSON string), `guided_regex` and `guided_choice`. At
most one may constrain a request. `strict` changes nothing here: the output follows the schema
whether or not it is set (OpenAI's strict mode only restricts which schemas it accepts).

Parsing (`parse_constraint`) checks the shapes and is pure; compiling (`GrammarCompiler`) needs
the served model's tokenizer and runs off the event loop, since llguidance takes about a second
to index a large vocabulary (once) and up to a few hundred milliseconds for a large schema. A
schema or regex the engine cannot compile is a 400 naming the problem and the field.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from serving.errors import bad_request
from tfjax.grammar import Grammar, GrammarTokenizer

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
MAX_CHOICES = 256  # `guided_choice` options: beyond this a regex or an enum schema is meant


@dataclass(frozen=True, slots=True)
class Constraint:
    """A validated constraint: `kind` is "json_schema", "regex", "choice" or "lark" (forced
    tool calls, `serving.tools`); `param` names the body field it came from, for errors."""

    kind: str
    value: Any  # the schema (dict), the pattern or grammar (str), the options (tuple of str)
    param: str


def parse_constraint(body: dict[str, Any]) -> Constraint | None:
    """The request's constraint, None for free text; a 400 for a malformed one or for two."""
    given = [name for name in FIELDS if body.get(name) is not None]
    given = [n for n in given if not (n == "response_format" and _is_text(body[n]))]
    if len(given) > 1:
        raise bad_request(f"Only one of {', '.join(given)} may be given.", param=given[1])
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                raise bad_request(f"'guided_json' is not valid JSON: {err}", name) from None
        return Constraint("json_schema", _schema(value, name), name)
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise bad_request("'guided_regex' must be a non-empty string.", param=name)
        return Constraint("regex", value, name)
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= MAX_CHOICES
        or not all(isinstance(v, str) and v for v in value)
    ):
        raise bad_request(
            f"'guided_choice' must be a list of 1 to {MAX_CHOICES} non-empty strings.", name
        )
    return Constraint("choice", tuple(value), name)


def _is_text(value: object) -> bool:
    return isinstance(value, dict) and value.get("type") == "text" and len(value) == 1


def _response_format(value: object) -> Constraint:
    param = "response_format"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return Constraint("json_schema", {"type": "object"}, param)
    if kind != "json_schema":
        raise bad_request(
            '\'response_format\' must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {...}}.',
            param=param,
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("'response_format.json_schema' must be an object.", param=param)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bad_request("'response_format.json_schema.name' must be a string.", param=param)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request("'response_format.json_schema.strict' must be a boolean.", param=param)
    return Constraint("json_schema", _schema(spec.get("schema"), param), param)


def _schema(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad_request("The JSON schema must be an object.", param=param)
    return value


class GrammarCompiler:
    """Compiles constraints against the served model's tokenizer, indexed on first use. A
    tokenizer without a HF `tokenizers` backend cannot drive grammars: 400."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self._grammars: GrammarTokenizer | None = None

    async def compile(self, constraint: Constraint) -> Grammar:
        if getattr(self._tokenizer, "backend", None) is None:
            raise bad_request(
                "Structured outputs are not supported for this model's tokenizer.",
                param=constraint.param,
            )
        try:
            return await asyncio.to_thread(self._compile, constraint)
        except ValueError as err:
            raise bad_request(f"'{constraint.param}': {err}", param=constraint.param) from None

    def _compile(self, constraint: Constraint) -> Grammar:
        if self._grammars is None:  # two first requests at once may both build it: harmless
            self._grammars = GrammarTokenizer(self._tokenizer)
        if constraint.kind == "json_schema":
            return self._grammars.json_schema(constraint.value)
        if constraint.kind == "regex":
            return self._grammars.regex(constraint.value)
        if constraint.kind == "lark":
            return self._grammars.lark(constraint.value)
        return self._grammars.choice(constraint.value)
