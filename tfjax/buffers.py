"""The reader model and the virtual buffer of one request (docs/definitions.md).

Token 1 is read when it is generated (c_1 = g_1); token j is read at
c_j = max(c_{j-1} + 1/r, g_j). The buffer at time t is the number of generated tokens not yet
read (c_k > t); the stall of token j is max(0, g_j - (c_{j-1} + 1/r)).

The engine keeps one `Reader` per request and calls `on_token` as tokens are generated, so the
scheduler can ask any request for its buffer without client feedback. The simulator and the
benchmarks feed the same class with simulated or observed arrival times, so all three agree.

Why unread tokens form a chain: a token k that is unread at time t >= g_k has c_k > g_k, so
c_k = c_{k-1} + 1/r. The unread tokens are therefore the tail of the generated sequence, spaced
exactly 1/r apart and ending at the last read time c_last, which makes the buffer O(1) to query.
"""

from __future__ import annotations

import math

_EPS = 1e-9  # absorbs float error in (c_last - t) * r before ceil


class Reader:
    """Reader model of one request with rate `rate` tokens/s (must be > 0)."""

    __slots__ = ("rate", "first_token_s", "last_read_s", "stall_s", "gen_times_s", "buffers")

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"consumption rate must be > 0 tokens/s, got {rate}")
        self.rate = float(rate)
        self.first_token_s: float | None = None
        self.last_read_s = 0.0  # c of the newest generated token
        self.stall_s = 0.0
        self.gen_times_s: list[float] = []  # g_j
        self.buffers: list[int] = []  # B_j: earlier tokens still unread when token j arrived

    @property
    def num_tokens(self) -> int:
        return len(self.gen_times_s)

    def on_token(self, gen_s: float) -> None:
        """Record that the next token was generated (or reached the client) at `gen_s`."""
        if self.first_token_s is None:
            self.first_token_s = gen_s
            self.last_read_s = gen_s
            self.buffers.append(0)
        else:
            last = self.last_read_s
            # buffer_tokens(gen_s), inlined: this runs once per generated token.
            self.buffers.append(math.ceil((last - gen_s) * self.rate - _EPS) if last > gen_s else 0)
            due_s = last + 1.0 / self.rate
            if gen_s > due_s:
                self.stall_s += gen_s - due_s
                self.last_read_s = gen_s
            else:
                self.last_read_s = due_s
        self.gen_times_s.append(gen_s)

    def buffer_tokens(self, now_s: float) -> int:
        """Generated tokens the reader has not read by `now_s` (0 before the first token)."""
        if self.first_token_s is None or self.last_read_s <= now_s:
            return 0
        return math.ceil((self.last_read_s - now_s) * self.rate - _EPS)

    def buffer_s(self, now_s: float) -> float:
        """Seconds until the reader wants a token that does not exist yet (0 if stalling).

        0 before the first token: a request still waiting for its first token has nothing to
        read, which gives it the most urgent priority in buffer-aware policies.
        """
        if self.first_token_s is None:
            return 0.0
        return max(0.0, self.last_read_s + 1.0 / self.rate - now_s)

    def stall_until_s(self, now_s: float) -> float:
        """Stall so far, counting a stall that is still going on at `now_s`."""
        if self.first_token_s is None:
            return 0.0
        return self.stall_s + max(0.0, now_s - (self.last_read_s + 1.0 / self.rate))
