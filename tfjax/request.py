"""Per-request host state: what was asked, what was generated, where its KV lives.

A `Request` is created by the engine when a prompt is submitted and is mutated only on the
engine thread. Scheduler policies and the simulator read it (never write it) through
`tfjax.sched.base.SchedulerView`. Device pages are listed in `page_ids`; the host-tier copy is
tracked by `kv.host.HostTier`, keyed by `request_id`.

Lifecycle (`RequestStatus`):

    WAITING --admit--> PREFILLING --last prompt chunk--> RUNNING --stop--> FINISHED
        ^                  |  ^                             |
        |                  |  +--resume by recompute----+   |
        |                  +--------preempt------------>PREEMPTED<--preempt--+
        |                                               |  resume by load
        |                                            LOADING --pages arrived--> RUNNING
        |                                                     (or PREFILLING mid-prefill)
    (any non-final state) --abort--> ABORTED

A LOADING request holds fresh device pages while its host copy travels back; it is in no
batch until the copy has arrived, which may take several steps.

Token bookkeeping: `token_ids` is prompt + output. `num_computed_tokens` counts tokens whose
KV sits in device pages; a RUNNING request always has exactly one uncomputed token, the last
sampled one, whose KV the next decode step writes. A request resumed by recompute re-prefills
`token_ids[:-1]` (prompt plus all output but the last token) and then decodes on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tfjax.buffers import Reader

if TYPE_CHECKING:  # the simulator and the scheduler never load the grammar engine
    from tfjax.grammar import Grammar, GrammarMatcher

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat `top_logprobs`


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    PREEMPTED = "preempted"
    LOADING = "loading"  # resumed by LOAD, host KV on its way back to its device pages
    FINISHED = "finished"
    ABORTED = "aborted"

    # Members are singletons compared by identity: hash them so too, in C. Enum's own
    # __hash__ is Python code, and the engine hashes statuses for every request every step.
    __hash__ = object.__hash__

    @property
    def is_final(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.ABORTED)


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached or the context is full
    ABORT = "abort"  # client went away or the server shut down
    ERROR = "error"  # the engine failed while running this request


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy.

    `seed` makes sampling reproducible whatever else shares the batch: the key of output
    token j is derived from (seed, j) only. Without a seed the engine draws one at submit.
    Bias and penalties are applied as `tfjax.logits` defines them (vLLM's definitions).
    `grammar` constrains the output (`tfjax.grammar`); each request gets its own matcher.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0  # 0: no min-p cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # None: no logprobs; else this many top alternatives too
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def has_penalties(self) -> bool:
        """The row needs `tfjax.logits.apply_penalties` (bias or any penalty)."""
        return bool(
            self.logit_bias
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
        )


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    arrival_s: float
    consumption_rate: float  # tokens/s the reader consumes (docs/definitions.md)
    priority: int = 0  # lower is served first (vLLM's priority scheduling); ties by arrival
    # False: the client reads the whole answer at the end (a non-streaming call), so there is
    # no buffer to keep fed and every token is wanted as soon as possible.
    streaming: bool = True
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    page_ids: list[int] = field(default_factory=list)  # device pages, in token order
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    reader: Reader = field(init=False)
    sent_offset: int = 0  # chars of detokenized text already streamed to the client
    num_cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Where the output stands in `sampling.grammar`: a function of `output_ids` only, so it
    # survives preemption, swap and recompute untouched.
    grammar: GrammarMatcher | None = field(init=False)

    def __post_init__(self) -> None:
        self.reader = Reader(self.consumption_rate)
        grammar = self.sampling.grammar
        self.grammar = None if grammar is None else grammar.matcher()

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_prefill_target(self) -> int:
        """Tokens that must be in device KV before the request can decode.

        A fresh request prefills its prompt; one resumed by recompute prefills everything but
        its last sampled token, which the next decode step consumes.
        """
        return self.num_tokens - 1 if self.output_ids else self.num_tokens

    @property
    def num_uncomputed_prefill(self) -> int:
        return self.num_prefill_target - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_final
