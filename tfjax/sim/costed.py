"""Cost-model runners: the engine's `StepRunner` whose step takes the profile's time.

`CostedRunner` runs a step of any token source on a `VirtualClock`: it advances the clock by
`CostProfile.step_s` of the step's bucket (`EngineConfig.bucket_for`, as the real runner pads
it: decode rows to a batch bucket, prefill chunks to whole tiles and a tile bucket) and of the
keys its decode rows read, then returns the token source's ids. The simulator's token source is
`ConstantTokens` (no KV, one fixed id, never EOS: outputs run to `max_tokens`); tests put
`tests/fakes.py`'s `FakeRunner` there instead, whose tokens depend on what the page tables read
back, and get the very same timeline. It also implements the `PageIO` the host tier copies
pages through: a gather is a `SimPages` record of its size in the profile's bytes, carrying the
token source's own gathered pages when it keeps KV (`page_store`, the fake's), which a scatter
writes back. With a `noise` generator and a profile whose `step_noise_sigma` is set, each step
costs a draw around its price (`noisy`) instead of the price itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from models.attention import QUERY_TILE
from tfjax.config import EngineConfig
from tfjax.kv.manager import PageIO, PrefillWork
from tfjax.request import Request
from tfjax.sim.clock import VirtualClock
from tfjax.sim.profiles import CostProfile, attention_pairs

SIM_TOKEN = 3  # the simulator's every output token


def step_price(
    profile: CostProfile,
    config: EngineConfig,
    prefill: Sequence[tuple[int, int]],
    decode_contexts: Sequence[int],
) -> float:
    """What a step costs on `profile`: its bucket's padded prefill tiles and decode rows, the
    keys its decode rows (holding `decode_contexts` tokens) read and the attention pairs of
    its prefill chunks, each given as (tokens computed before it, its tokens), as served
    (`CostProfile.served_step_factor`)."""
    bucket = config.bucket_for([n for _, n in prefill], len(decode_contexts))
    runner_s = profile.step_s(
        num_decode=bucket.rows,
        decode_contexts=decode_contexts,
        num_prefill=bucket.tiles * QUERY_TILE,
        prefill_pairs=sum(attention_pairs(before, n) for before, n in prefill),
    )
    return runner_s * profile.served_step_factor


def noisy(seconds: float, sigma: float, rng: random.Random) -> float:
    """`seconds` times a log-normal draw of log-spread `sigma` whose mean is 1, so noise
    spreads the steps without changing what they cost on average."""
    return seconds * math.exp(rng.gauss(-0.5 * sigma**2, sigma))


class TokenSource(Protocol):
    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> Sequence[int]: ...


class ConstantTokens:
    """Every sampled token is `SIM_TOKEN`."""

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> list[int]:
        return [SIM_TOKEN] * (len(prefill) + len(decode))


@dataclass(frozen=True, slots=True)
class SimPages:
    """What a gather of `num_slots` pages would have produced (shape and size only)."""

    num_slots: int
    nbytes: int  # in the profile's KV bytes: what the modelled link moves
    data: object = None  # the page store's gathered pages, if the run has one

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1, 1, self.num_slots)  # the page axis is 2, as in `gather_pages`


class CostedRunner:
    def __init__(
        self,
        profile: CostProfile,
        clock: VirtualClock,
        config: EngineConfig,
        *,
        page_size: int,
        num_pages: int,
        max_model_len: int,
        tokens: TokenSource | None = None,
        page_store: PageIO | None = None,
        noise: random.Random | None = None,
    ) -> None:
        self.profile = profile
        self.clock = clock
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.kv_bytes_per_token = profile.kv_bytes_per_token
        # The first estimates a warm-up would measure, at one page of context per row.
        warm = profile.costs(page_size)
        self.decode_step_s = dict(warm.decode_step_s)
        self.prefill_token_s = warm.prefill_token_s
        self.tokens = tokens or ConstantTokens()
        self.page_store = page_store
        self.noise = noise if profile.step_noise_sigma > 0 else None
        self.num_steps = 0
        self.busy_s = 0.0

    def step(self, prefill: Sequence[PrefillWork], decode: Sequence[Request]) -> Sequence[int]:
        seconds = step_price(
            self.profile,
            self.config,
            [(w.request.num_computed_tokens, w.num_tokens) for w in prefill],
            [r.num_tokens for r in decode],
        )
        if self.noise:
            seconds = noisy(seconds, self.profile.step_noise_sigma, self.noise)
        ids = self.tokens.step(prefill, decode)
        self.clock.advance(seconds)
        self.num_steps += 1
        self.busy_s += seconds
        return ids

    # PageIO
    @property
    def max_gather_pages(self) -> int:
        return self.num_pages

    @property
    def page_bytes(self) -> int:
        return self.kv_bytes_per_token * self.page_size

    def gather(self, page_ids: Sequence[int]) -> SimPages:
        data = self.page_store.gather(page_ids) if self.page_store else None
        return SimPages(len(page_ids), len(page_ids) * self.page_bytes, data)

    def scatter(self, page_ids: Sequence[int], pages: SimPages) -> None:
        if self.page_store:
            self.page_store.scatter(page_ids, pages.data)
