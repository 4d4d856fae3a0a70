"""A model-free runner whose outputs can be computed by hand (JetStream's mock-engine idea).

`FakeRunner` stores token ids in a paged "KV" array exactly where the real runner would store
K/V, and derives each next token from what it reads back through the request's page table.
So a wrong page table, a lost page or a bad recompute changes the tokens, and engine tests
can compare against `reference_tokens` without any weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfjax.engine import Engine
from tfjax.kv.manager import PrefillWork
from tfjax.request import MAX_TOP_LOGPROBS, Request
from tfjax.sampling import TokenLogprobs

VOCAB = 1000
EOS = 2
IDLE_STEP_S = 0.001  # how long `drive` sleeps after a step with nothing to run


def next_token(context: Sequence[int]) -> int:
    """The fake model: a position-weighted hash of the whole context, never EOS."""
    value = sum((i + 1) * t for i, t in enumerate(context)) % (VOCAB - 3)
    return value + 3


def reference_tokens(prompt: Sequence[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class FakeTokenizer:
    eos_token_ids = frozenset({EOS})

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class FakeRunner:
    kv_bytes_per_token = 64
    prefill_token_s = 1e-4  # cost estimates a real runner measures at warm-up
    pages_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def __init__(self, *, num_pages: int, page_size: int = 4, max_model_len: int = 256) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.kv = np.full((num_pages, page_size), -1, np.int64)
        self.num_calls = 0
        self.decode_step_s = {1: 0.01, 32: 0.05}

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> np.ndarray:
        """The runner's one call per step: prefill chunks' next tokens, then decode rows'."""
        ids = [int(self.prefill(w.request, w.num_tokens)[0]) for w in prefill]
        if decode:
            ids.extend(self.decode(decode).tolist())
        return np.array(ids, np.int64)

    def step_scored(
        self, prefill: Sequence[PrefillWork], decode: Sequence[Request]
    ) -> tuple[np.ndarray, TokenLogprobs]:
        """`step`, scored as the fake model is sure: the chosen token has logprob 0 and the
        next ids follow, each one nat less likely."""
        ids = self.step(prefill, decode)
        top_ids = (ids[:, None] + np.arange(MAX_TOP_LOGPROBS)) % VOCAB
        top = -np.broadcast_to(np.arange(MAX_TOP_LOGPROBS, dtype=np.float32), top_ids.shape)
        return ids, TokenLogprobs(token=np.zeros(len(ids), np.float32), top_ids=top_ids, top=top)

    def prefill(self, request: Request, num_tokens: int) -> np.ndarray:
        start = request.num_computed_tokens
        for pos in range(start, start + num_tokens):
            self._write(request, pos, request.token_ids[pos])
        return np.array([next_token(self._read(request, start + num_tokens))])

    def decode(self, requests: Sequence[Request]) -> np.ndarray:
        out = []
        for request in requests:
            pos = request.num_tokens - 1
            self._write(request, pos, request.token_ids[pos])
            out.append(next_token(self._read(request, pos + 1)))
        return np.array(out)

    # PageIO: the host tier copies pages through these, like the real runner's gather/scatter.
    @property
    def max_gather_pages(self) -> int:
        return self.num_pages

    @property
    def page_bytes(self) -> int:
        return self.kv_bytes_per_token * self.page_size

    def gather(self, page_ids: Sequence[int]) -> jnp.ndarray:
        return jnp.asarray(self.kv[np.asarray(page_ids, np.int64)][None, None])  # [1, 1, N, S]

    def scatter(self, page_ids: Sequence[int], pages: jnp.ndarray) -> None:
        data = np.asarray(pages)[0, 0]
        for i, page in enumerate(page_ids):
            if page:
                self.kv[page] = data[i]

    def _write(self, request: Request, pos: int, token: int) -> None:
        self.num_calls += 1
        page = request.page_ids[pos // self.page_size]
        assert page != 0, "wrote into the padding page"
        self.kv[page, pos % self.page_size] = token

    def _read(self, request: Request, length: int) -> list[int]:
        flat = self.kv[request.page_ids].reshape(-1)[:length]
        assert (flat >= 0).all(), "read a slot that was never written"
        return flat.tolist()


def drive(
    engine: Engine,
    requests: Sequence[Request],
    *,
    every: int = 1,
    sync_transfers: bool = False,
    max_steps: int = 10_000,
    timeout_s: float = 120.0,
) -> int:
    """Submit one request per `every` steps, step until all finish, checking the page books
    after every step; with `sync_transfers`, wait for host copies after each step. Returns the
    number of steps that ran.

    A step with nothing to run (every request left is waiting for a host copy) sleeps like
    the server's engine thread and does not count towards `max_steps`: how many such steps
    pass depends on the copy threads, not on the policy."""
    pending, ticks, steps = list(requests), 0, 0
    deadline = time.monotonic() + timeout_s
    while pending or engine.has_work:
        if pending and ticks % every == 0:
            engine.add_request(pending.pop(0))
        ticks += 1
        ran = engine.step()
        if sync_transfers and engine.kv.offload:
            engine.kv.offload.transfers.d2h.drain()
        engine.check_idle()
        if ran:
            steps += 1
        else:
            time.sleep(IDLE_STEP_S)
        assert steps < max_steps and time.monotonic() < deadline, "no progress"
    if engine.kv.offload:
        engine.kv.offload.transfers.d2h.drain()
    return steps
