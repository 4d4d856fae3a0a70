"""OpenAI request parsing and validation (responses are built by `serving.responses`).

Parsing is hand-written over the decoded JSON instead of a schema library so that every way a
body can be wrong (bad JSON, wrong types, NaN, booleans posing as integers, out-of-range values,
unsupported options) becomes an `APIError` with status 400 and the offending `param`: no body can
reach the engine invalid or make the server answer 500. Every field of OpenAI's chat and
completions bodies (and the vLLM extensions clients send to peers) is either in
`HONOURED_FIELDS` or in `REFUSED_UNLESS`: a field we cannot honour is a 400 unless it carries a
value meaning "off", never silently ignored, because the answer would be wrong (a client asking
for JSON would get free text). Fields no API defines are ignored, as clients send extras.

Defaults follow OpenAI: temperature 1, top_p 1; `max_tokens` 16 on /v1/completions and "the rest
of the context" on /v1/chat/completions (as vLLM). Extensions: `consumption_rate` (tokens/s the
reader consumes, docs/definitions.md; at least `MIN_CONSUMPTION_RATE`; the server default
when missing), `priority`, `top_k` (-1 or 0: no cut), `ignore_eos`, and vLLM's
`stop_token_ids`, `repetition_penalty` and `min_p`. `logprobs` is a count of alternatives on
/v1/completions (0-5) and a boolean with `top_logprobs` (0-20) on chat: both become
`SamplingParams.logprobs`. Structured outputs (`response_format`, vLLM's `guided_json`,
`guided_regex`, `guided_choice`) are parsed by `serving.constraints`, chat's `tools` by
`serving.tools`. Completions' `best_of` (n to MAX_CHOICES, not streamed) runs that many
sequences and answers the n with the highest cumulative raw logprob (`serving.app`).
Strings must be valid Unicode: a lone surrogate (legal in JSON as "\\ud800") is a 400.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from serving import constraints
from serving.errors import bad_request
from serving.tools import ToolRequest, parse_tools, template_message
from tfjax.logits import MAX_LOGIT_BIAS
from tfjax.request import MAX_TOP_LOGPROBS, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on completions `logprobs`
MAX_CHOICES = 16  # `n`: each choice is a request; OpenAI allows 128, we keep one body small

# Fields of OpenAI's chat and completions request bodies (openai-python's
# `CompletionCreateParams`) that are honoured whatever their (valid) value. Informational ones
# count: `user`, `metadata`, `safety_identifier` and `prompt_cache_key` change no output, and
# the prefix cache serves repeated prefixes whether or not a key names them.
HONOURED_FIELDS = frozenset(
    {
        "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
        "top_p", "seed", "stop", "stream", "stream_options", "user", "metadata",
        "safety_identifier", "prompt_cache_key", "presence_penalty", "frequency_penalty",
        "logit_bias", "repetition_penalty", "min_p", "logprobs", "top_logprobs",
        "n", "best_of", *constraints.FIELDS, "tools", "tool_choice", "parallel_tool_calls",
    }
)  # fmt: skip
# Options we do not implement, OpenAI's and the vLLM extensions clients send to peers, with
# the values (besides null) that mean "off" and are therefore accepted. Compared with their
# type too, since True == 1 in Python.
REFUSED_UNLESS: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "suffix": ("",),
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "moderation": (),
    "store": (False,),  # we keep nothing for OpenAI's evals or distillation
    "service_tier": ("auto", "default"),  # one tier: the one every request gets
    "prompt_cache_retention": ("in_memory", "in-memory"),  # our cache lives in memory only
    "prompt_cache_options": (),
    # vLLM's extensions
    "min_tokens": (0,),
    "guided_grammar": (),
    "structured_outputs": (),
    "prompt_logprobs": (0,),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "truncate_prompt_tokens": (),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "chat_template": (),
    "chat_template_kwargs": ({},),
}
_INT64 = 2**63
SEED_SPACE = 2**32  # the engine's PRNG seeds are uint32; OpenAI's are any int64
_TOP_K_MAX = 2**31 - 1  # the runner's top-k is int32; a cut beyond the vocabulary is no cut
# Stop strings are matched on the engine thread after every token, at a cost that grows with
# their number times their length squared: unbounded, one request could slow every stream.
MAX_STOP_STRINGS = 16  # OpenAI allows 4
MAX_STOP_CHARS = 256
# Slower readers make 1/rate overflow the reader model's float arithmetic (5e-324 -> inf).
MIN_CONSUMPTION_RATE = 1e-3  # tokens/s: one token every ~17 minutes
# No valid body nests deeper than messages[i].content[j] (4 levels); a deep one is an attack or
# a bug, and every later walk over the body (validation, re-encoding) would pay for its depth.
MAX_JSON_DEPTH = 32
# (low, high, off) of each penalty: OpenAI's ranges; vLLM's for its extensions, with
# repetition_penalty's upper end ours (beyond it every seen token is all but banned anyway).
_PENALTY_RANGES = {
    "presence_penalty": (-2.0, 2.0, 0.0),
    "frequency_penalty": (-2.0, 2.0, 0.0),
    "repetition_penalty": (0.0, 10.0, 1.0),
    "min_p": (0.0, 1.0, 0.0),
}
_CONTAINERS = frozenset({dict, list})


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerateOptions:
    """Everything of a request body but the prompt or messages, validated."""

    model: str | None  # None: the served model
    max_tokens: int | None  # None: the endpoint's default, see `sampling_params`
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    consumption_rate: float | None = None  # None: the server's --default-consumption-rate
    priority: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # None: none; else this many top alternatives per token
    n: int = 1  # choices, each its own engine request
    best_of: int = 1  # completions: sequences generated, of which the n likeliest are answered
    constraint: constraints.Constraint | None = None  # structured output (`serving.constraints`)
    tools: ToolRequest | None = None  # chat only: tools the model may call (`serving.tools`)


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise bad_request(f"The request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise bad_request(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")
    try:  # JSON lets "\ud800" through; tokenizers and our own UTF-8 answers cannot take it
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise bad_request("The request body contains a lone UTF-16 surrogate.") from None
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of JSON as `json.loads` returns it (a scalar is 0, `[]` is 1), without
    recursion. A container's children are only walked when some are containers (the type scan
    runs in C), so a prompt of a million token ids costs milliseconds."""
    depth, stack = 0, [(value, 1)] if type(value) in _CONTAINERS else []
    while stack:
        node, level = stack.pop()
        depth = max(depth, level)
        children = node.values() if type(node) is dict else node
        if not _CONTAINERS.isdisjoint(set(map(type, children))):
            stack.extend((c, level + 1) for c in children if type(c) in _CONTAINERS)
    return depth


def parse_completion(body: dict[str, Any]) -> tuple[str | list[int], GenerateOptions]:
    """`prompt` is a string or a list of token ids; a batch of one is unwrapped."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad_request(
            "Batched prompts are not supported: send one request per prompt.", param="prompt"
        )
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and all(_is_int(t) and 0 <= t < 2**31 for t in prompt)
    ):
        if parse_tools(body) is not None:
            raise bad_request("'tools' is a chat option.", param="tools")
        if body.get("top_logprobs") is not None:
            raise bad_request(
                "'top_logprobs' is a chat option: completions take 'logprobs': <count>.",
                param="top_logprobs",
            )
        logprobs = _opt_int(body, "logprobs")
        if logprobs is not None and not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise bad_request(
                f"'logprobs' must be in [0, {MAX_COMPLETION_LOGPROBS}].", param="logprobs"
            )
        options = _parse_options(body)
        return prompt, replace(options, logprobs=logprobs, best_of=_parse_best_of(body, options))
    raise bad_request(
        "'prompt' must be a string or a list of non-negative token ids.", param="prompt"
    )


def parse_chat(body: dict[str, Any]) -> tuple[list[dict[str, Any]], GenerateOptions]:
    """Messages come back as `{"role", "content"}` with text parts joined into one string,
    plus an assistant turn's `tool_calls` and a tool turn's `tool_call_id`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list.", param="messages")
    options = _parse_options(body)
    if _opt_int(body, "best_of") not in (None, 1):
        raise bad_request("'best_of' is a completions option.", param="best_of")
    tools = parse_tools(body)
    forced = tools.constraint() if tools else None
    if forced is not None and options.constraint is not None:
        raise bad_request(
            f"'{options.constraint.param}' cannot be combined with a forced 'tool_choice'.",
            param="tool_choice",
        )
    options = replace(
        options,
        logprobs=_parse_chat_logprobs(body),
        tools=tools,
        constraint=forced or options.constraint,
    )
    return [_parse_message(m) for m in messages], options


def _parse_best_of(body: dict[str, Any], options: GenerateOptions) -> int:
    """Completions' `best_of`: n <= best_of <= MAX_CHOICES, not streamed (as OpenAI)."""
    best_of = _opt_int(body, "best_of")
    if best_of is None:
        return options.n
    if not options.n <= best_of <= MAX_CHOICES:
        raise bad_request(f"'best_of' must be in [n, {MAX_CHOICES}].", param="best_of")
    if best_of > options.n and options.stream:
        raise bad_request("'best_of' greater than 'n' cannot be streamed.", param="best_of")
    return best_of


def _parse_chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's `logprobs: true` with `top_logprobs` alternatives (0-20), as one count."""
    top = _opt_int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}].", "top_logprobs")
    if not _opt_bool(body, "logprobs"):
        if top:
            raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
        return None
    return top or 0


def sampling_params(
    options: GenerateOptions,
    *,
    num_prompt_tokens: int,
    max_model_len: int,
    default_max_tokens: int | None,
) -> SamplingParams:
    """Sampling params once the prompt length is known; `default_max_tokens=None` means the
    rest of the context. Raises a 400 if prompt plus output cannot fit `max_model_len`."""
    if num_prompt_tokens == 0:
        raise bad_request("The prompt is empty.", param="prompt")
    room = max_model_len - num_prompt_tokens
    max_tokens = options.max_tokens or default_max_tokens or max(room, 1)
    if max_tokens > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens" if room > 0 else "prompt",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        logit_bias=options.logit_bias,
        logprobs=options.logprobs,
        seed=None if options.seed is None else options.seed % SEED_SPACE,
        stop=options.stop,
        stop_token_ids=options.stop_token_ids,
        ignore_eos=options.ignore_eos,
    )


def _parse_options(body: dict[str, Any]) -> GenerateOptions:
    for name, off in REFUSED_UNLESS.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(a) and value == a for a in off):
            raise bad_request(f"'{name}' is not supported by this server.", param=name)
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        _opt_str(body, name)
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise bad_request("'metadata' must be an object of strings.", param="metadata")

    stream = _opt_bool(body, "stream") or False
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if stream_options is not None and not stream:
        raise bad_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )
    include_usage = _opt_bool(stream_options or {}, "include_usage", "stream_options.") or False

    max_tokens = _opt_int(body, "max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _opt_int(body, "max_tokens"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{param}' must be at least 1.", param=param)

    temperature = _opt_number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise bad_request("'temperature' must be >= 0.", param="temperature")
    top_p = _opt_number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad_request("'top_p' must be in (0, 1].", param="top_p")
    top_k = _opt_int(body, "top_k")
    if top_k is not None and top_k < -1:
        raise bad_request("'top_k' must be -1 or 0 (no cut) or a positive integer.", "top_k")
    n = _opt_int(body, "n")
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"'n' must be in [1, {MAX_CHOICES}].", param="n")
    penalties = {
        name: _opt_bounded(body, name, low, high, default)
        for name, (low, high, default) in _PENALTY_RANGES.items()
    }
    if penalties["repetition_penalty"] == 0:
        raise bad_request("'repetition_penalty' must be > 0.", param="repetition_penalty")
    seed = _opt_int(body, "seed")
    if seed is not None and not -_INT64 <= seed < _INT64:
        raise bad_request("'seed' must fit in a signed 64-bit integer.", param="seed")
    rate = _opt_number(body, "consumption_rate")
    if rate is not None and rate < MIN_CONSUMPTION_RATE:
        raise bad_request(
            f"'consumption_rate' must be at least {MIN_CONSUMPTION_RATE} tokens/s.",
            param="consumption_rate",
        )
    priority = _opt_int(body, "priority")
    if priority is not None and not -_INT64 <= priority < _INT64:
        raise bad_request("'priority' must fit in a signed 64-bit integer.", param="priority")

    return GenerateOptions(
        model=_opt_str(body, "model"),
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=min(max(top_k or 0, 0), _TOP_K_MAX),
        seed=seed,
        stop=_parse_stop(body.get("stop")),
        stop_token_ids=_parse_stop_token_ids(body.get("stop_token_ids")),
        ignore_eos=_opt_bool(body, "ignore_eos") or False,
        stream=stream,
        include_usage=include_usage,
        consumption_rate=rate,
        priority=priority or 0,
        logit_bias=_parse_logit_bias(body.get("logit_bias")),
        n=n or 1,
        constraint=constraints.parse_constraint(body),
        **penalties,
    )


def _parse_message(message: object) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad_request("Each message must be an object.", param="messages")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise bad_request("Each message needs a string 'role'.", param="messages")
    content = message.get("content")
    if content is None and role == "assistant":  # an assistant turn that only made tool calls
        content = ""
    extra = _parse_tool_turn(message)
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise bad_request("Only text content parts are supported.", param="messages")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise bad_request("Each text content part needs a string 'text'.", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(
            "Message 'content' must be a string or a list of text parts.", param="messages"
        )
    return template_message({"role": role, "content": content, **extra})


def _parse_tool_turn(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant turn's `tool_calls` and a tool result's `tool_call_id`, checked."""
    extra = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(
            isinstance(c, dict)
            and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), str)
            for c in calls
        ):
            raise bad_request(
                '\'tool_calls\' must be a list of {"function": {"name", "arguments"}}.',
                param="messages",
            )
        extra["tool_calls"] = calls
    call_id = message.get("tool_call_id")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise bad_request("'tool_call_id' must be a string.", param="messages")
        extra["tool_call_id"] = call_id
    return extra


def _parse_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(
            "'stop' must be a non-empty string or a list of non-empty strings.", param="stop"
        )
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(
            f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
            "characters.",
            param="stop",
        )
    return tuple(stops)


def _parse_stop_token_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < 2**31 for t in ids):
        raise bad_request("'stop_token_ids' must be a list of token ids.", param="stop_token_ids")
    return tuple(ids)


def _parse_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` with biases in [-100, 100], as sorted (id, bias) pairs.
    An id beyond the model's logits biases nothing (the device scatter drops it), as no such
    token can be sampled anyway."""
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(
            f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids.",
            param="logit_bias",
        )
    pairs = {}
    for key in bias:
        if not (
            isinstance(key, str)
            and key.isascii()
            and key.isdigit()
            and len(key) <= 10
            and int(key) < 2**31
        ):
            raise bad_request(f"'logit_bias' key {key!r} is not a token id.", param="logit_bias")
        pairs[int(key)] = _opt_bounded(bias, key, -100.0, 100.0, 0.0, param="logit_bias")
    return tuple(sorted(pairs.items()))


def _opt_bounded(
    body: dict[str, Any],
    name: str,
    low: float,
    high: float,
    default: float,
    param: str | None = None,
) -> float:
    value = _opt_number(body, name, param)
    if value is None:
        return default
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low}, {high}].", param=param or name)
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and not _is_int(value):
        raise bad_request(f"'{name}' must be an integer.", param=name)
    return value


def _opt_number(body: dict[str, Any], name: str, param: str | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be a finite number.", param=param or name)
    try:
        number = float(value)  # json allows NaN and Infinity, and integers beyond float range
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise bad_request(f"'{name}' must be a finite number.", param=param or name)
    return number


def _opt_bool(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"'{prefix}{name}' must be a boolean.", param=prefix + name)
    return value


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string.", param=name)
    return value
