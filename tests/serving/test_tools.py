"""Tools over HTTP on the tiny random Qwen2 with a scripted Hermes-style chat template: forced
calls (a named function, `required`) parse into `tool_calls` with arguments that validate,
streamed and not, read by the official `openai` client; `auto` leaves free text alone; a model
whose template takes no tools, and malformed tools, are 400s. `ToolCallStream` is checked on
its own: any split of an answer into pieces gives the same content and calls."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from models.tokenizer import Tokenizer
from serving.tools import ToolCallStream, split_answer
from tests.serving.tiny_engine import tiny_async_engine
from tfjax.async_engine import AsyncEngine

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
TOOLS_TEMPLATE = (  # Qwen2.5's shape, naming the tools only (the tiny vocabulary is bytes)
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %}"
    "{{ tool['function']['name'] }} {% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n"
    "</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "weather in Oslo?"}]


@pytest.fixture(scope="module")
def served(tiny_qwen2_engine_parts) -> Iterator[AsyncEngine]:
    plain = tiny_qwen2_engine_parts[2]
    tokenizer = Tokenizer(
        plain.backend,
        chat_template=TOOLS_TEMPLATE,
        special_tokens=plain.special_tokens,
        eos_token_ids=plain.eos_token_ids,
    )
    yield from tiny_async_engine(tiny_qwen2_engine_parts, tokenizer)


def check_call(name: str, arguments: str, want: str | None = None) -> None:
    assert name in SCHEMAS and name == (want or name)
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize(
    "choice", [{"type": "function", "function": {"name": "get_time"}}, "required"]
)
async def test_a_forced_call_reaches_the_openai_client(
    served_oai: openai.AsyncOpenAI, choice
) -> None:
    want = "get_time" if isinstance(choice, dict) else None
    for seed in range(3):
        reply = await served_oai.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        choice0 = reply.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        assert choice0.message.content is None
        [call] = choice0.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments, want)


async def test_a_forced_call_streams_as_tool_call_deltas(served_oai: openai.AsyncOpenAI) -> None:
    stream = await served_oai.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=120,
        stream=True,
        seed=1,
    )
    calls, content, finish = {}, "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0]
    check_call(calls[0]["name"], calls[0]["arguments"], "get_weather")


async def test_parallel_required_calls_all_parse(http: httpx.AsyncClient) -> None:
    """With parallel calls allowed the model may chain several blocks (or run out of tokens
    in one): every finished block is a valid call."""
    body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 120}
    for seed in range(3):
        r = await http.post(CHAT, json={**body, "seed": seed})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        for call in choice["message"].get("tool_calls") or ():
            check_call(call["function"]["name"], call["function"]["arguments"])
        assert choice["finish_reason"] in ("tool_calls", "length")


async def test_auto_and_a_tool_conversation_render(http: httpx.AsyncClient) -> None:
    """`auto` (the random model writes no block) answers free text; a conversation with an
    assistant call and the tool's result renders through the template."""
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    ]
    r = await http.post(CHAT, json={"messages": messages, "tools": TOOLS, "max_tokens": 8})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
async def test_bad_tools_are_400s(http: httpx.AsyncClient, extra: dict, param: str) -> None:
    r = await http.post(CHAT, json={"messages": MESSAGES, "tools": TOOLS, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_tools_need_a_template_that_takes_them(client: httpx.AsyncClient) -> None:
    """The fake engine's template renders no tools; completions take none at all."""
    body = {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 2}
    r = await client.post(CHAT, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = await client.post("/v1/completions", json={"prompt": "hi", "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    none = await client.post(CHAT, json={**body, "tool_choice": "none"})
    assert none.status_code == 200, none.text


ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n'
    "</tool_call>\n<tool_call>\nnot json\n</tool_call> <tool_"
)


def test_any_split_of_an_answer_gives_the_same_content_and_calls() -> None:
    def run(pieces: list[str]) -> tuple[str, list[tuple[int, str, str]]]:
        stream, content, calls = ToolCallStream(), "", []
        for piece in pieces:
            text, new = stream.push(piece)
            content += text
            calls += [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in new]
        return content + stream.flush(), calls

    whole = run([ANSWER])
    assert whole == (
        "Let me check.\n<tool_call>\nnot json\n</tool_call> <tool_",
        [
            (0, "get_weather", '{"city": "Oslo"}'),
            (1, "get_time", '{"zone": "utc"}'),
        ],
    )
    for size in (1, 2, 3, 7, 11):
        assert run([ANSWER[i : i + size] for i in range(0, len(ANSWER), size)]) == whole
    content, calls = split_answer(ANSWER)
    assert content == whole[0].strip() and [c["function"]["name"] for c in calls] == [
        "get_weather",
        "get_time",
    ]
    assert split_answer("  no calls here ") == ("  no calls here ", [])
