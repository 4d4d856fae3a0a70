"""A stand-in for `AsyncEngine` whose every output can be computed by hand (JetStream's mock).

Tokenizer: one token per character, id = `ord(char)`. Chat template: `<role>content\\n` per
message, then `<assistant>`; a message with role "bad" makes the template raise, as a real
template does on a conversation it rejects.

Engine: output token k (k = 0, 1, ...) of a prompt is the letter `chr(97 + (sum(prompt) + k) %
26)`, so `expected_text(prompt_ids, n)` is the output of `n` tokens. One delta per token, every
`token_delay_s` (the first after `first_token_delay_s`). A stream ends with LENGTH after
`max_tokens` tokens, or with STOP at the first stop string (text cut before it; like the real
engine it never sends part of a stop string), or with ERROR after `fail_after` tokens, or with
ABORT when `abort` is called. Knobs: `raise_on_submit` (an exception `submit` raises),
`healthy`. Records: `submitted` (every accepted `Submission`), `aborted` (request ids).
With `SamplingParams.logprobs` set, every token carries `fake_logprob(token_id, k, n)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tfjax.api import Delta, EngineStats, TokenLogprob
from tfjax.request import FinishReason, SamplingParams

STATS = EngineStats(
    num_waiting=3,
    num_running=5,
    num_preempted=2,
    device_pages_used=40,
    device_pages_total=100,
    host_pages_used=7,
    host_pages_total=400,
    offload_bytes_d2h=4096,
    offload_bytes_h2d=1024,
    num_preemptions=11,
    num_compiles_after_warmup=0,
    num_compiled_buckets=10,
    num_buckets=26,
    num_generated_tokens=1234,
    effective_tokens=1000.5,
    extra={"mean_stall_s": 0.25},
)


def fake_logprob(token_id: int, k: int, num_top: int) -> TokenLogprob:
    """Output token k's logprob is -k/4; its alternatives are itself and the next ids, each
    one nat less likely than the one before."""
    top = tuple((token_id + j, -k / 4 - j) for j in range(num_top))
    return TokenLogprob(token_id, -k / 4, top)


def expected_text(prompt_ids: Sequence[int], num_tokens: int) -> str:
    return "".join(chr(97 + (sum(prompt_ids) + k) % 26) for k in range(num_tokens))


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if any(m["role"] == "bad" for m in messages):
            raise ValueError("roles must alternate user/assistant")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text


@dataclass(frozen=True, slots=True)
class Submission:
    prompt_ids: list[int]
    sampling: SamplingParams
    consumption_rate: float | None
    priority: int
    request_id: str
    streaming: bool = True


class FakeStream:
    def __init__(self, engine: FakeEngine, submission: Submission) -> None:
        self.request_id = submission.request_id
        self._engine = engine
        self._sub = submission
        self._aborted = asyncio.Event()

    def abort(self) -> None:
        self._aborted.set()

    async def _wait(self, delay_s: float) -> bool:
        """Sleep `delay_s`; True if aborted meanwhile."""
        try:
            await asyncio.wait_for(self._aborted.wait(), delay_s)
        except TimeoutError:
            return False
        return True

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._run()

    async def _run(self) -> AsyncIterator[Delta]:
        prompt, sampling, engine = self._sub.prompt_ids, self._sub.sampling, self._engine
        max_stop = max((len(s) for s in sampling.stop), default=1)
        sent = 0
        for k in range(1, sampling.max_tokens + 1):
            delay = engine.first_token_delay_s if k == 1 else engine.token_delay_s
            if await self._wait(delay):
                yield Delta("", (), len(prompt), k - 1, FinishReason.ABORT)
                return
            if engine.fail_after is not None and k > engine.fail_after:
                yield Delta("", (), len(prompt), k - 1, FinishReason.ERROR, error="boom")
                return
            text = expected_text(prompt, k)
            token = (ord(text[-1]),)
            asked = sampling.logprobs
            lp = None if asked is None else (fake_logprob(token[0], k, asked),)
            cut = min((i for s in sampling.stop if (i := text.find(s)) >= 0), default=None)
            if cut is not None:
                yield Delta(text[sent:cut], token, len(prompt), k, FinishReason.STOP, logprobs=lp)
                return
            if k == sampling.max_tokens:
                yield Delta(text[sent:], token, len(prompt), k, FinishReason.LENGTH, logprobs=lp)
                return
            safe = len(text) - (max_stop - 1)  # hold back what may start a stop string
            yield Delta(text[sent:safe], token, len(prompt), k, logprobs=lp)
            sent = max(sent, safe)


class FakeEngine:
    def __init__(self, *, max_model_len: int = 64) -> None:
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.healthy = True
        self.raise_on_submit: Exception | None = None
        self.first_token_delay_s = 0.0
        self.token_delay_s = 0.0
        self.fail_after: int | None = None
        self.submitted: list[Submission] = []
        self.aborted: list[str] = []
        self.streams: dict[str, FakeStream] = {}
        self.shut_down = False

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        return STATS

    def submit(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingParams,
        *,
        consumption_rate: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        streaming: bool = True,
    ) -> FakeStream:
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        request_id = request_id or f"fake-{len(self.submitted)}"
        sub = Submission(
            list(prompt_ids), sampling, consumption_rate, priority, request_id, streaming
        )
        self.submitted.append(sub)
        self.streams[request_id] = FakeStream(self, sub)
        return self.streams[request_id]

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self.streams:
            self.streams[request_id].abort()

    def shutdown(self) -> None:
        self.shut_down = True
