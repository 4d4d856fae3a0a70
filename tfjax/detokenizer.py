"""Incremental detokenizing of one request's output, with stop strings.

Decoding the whole output after every token is quadratic, so we decode a short window: text
of `ids[prefix:]` minus text of `ids[prefix:read]` is what the newest tokens add (the window
keeps enough left context for tokenizers whose pieces depend on their neighbours). A delta
ending in U+FFFD is held back: the token stream is in the middle of a multi-byte character.

Stop strings may span token boundaries, so text that could be the start of a stop string is
held back until it is decided; when a stop string completes, the text before it is released
and the stream ends. `sent` is the number of characters already released (the request's
`sent_offset`): nothing is ever released twice, whatever preemption does to the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class Detokenizer:
    def __init__(self, decoder: Decoder, stop: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids[prefix:read] is already part of `text`
        self.text = ""  # all decoded text so far (stop string excluded once hit)
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        """Add one token; return newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decoder.decode(self._ids[self._prefix : self._read])
        new_text = self._decoder.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The stream ends: release everything held back for stop-string matching."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        search_from = max(0, self.sent - max((len(s) for s in self._stop), default=0))
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
