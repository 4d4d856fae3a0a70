"""`KVManager.execute(plan)`: applies a plan's page operations to the requests, nothing else.

It owns the device `PageAllocator` and, when offload is on, the `Offload` bundle (host tier,
transfer links, the runner's page gather/scatter). It moves requests between statuses and
returns the `StepWork` the runner executes; it never runs the model.

The host tier is used only when the policy can resume by LOAD (`swaps`); a policy that always
recomputes gets neither write-through nor swap preemption, whose copies it would never read.
All copies are per request: one gather, one buffer, one transfer per request and call, so a
resume moves only that request's pages.

Preempt: synced pages are already on the host (write-through), so only the unsynced tail is
gathered into a fresh buffer and queued for the host; the device pages are free at once, in
this very step. With the host budget exhausted, or offload off, the KV is dropped and the
request will resume by recompute (logged). Resume by LOAD: fresh device pages at once, the
request turns LOADING and the H2D worker copies its host blocks back (after queued evictions
under `--no-overlap`); `complete_loads`, called at the start of every step, scatters the
arrived ones on the engine thread, which never waits for a copy. Plan entries that decode or
prefill a request resumed by LOAD in the same plan are skipped: it joins the batch in the
first step after its pages arrived. Write-through (`write_through`) runs after each step.

Invariants, checked by `check` whenever the engine is idle and in tests: both tiers' books
balance, every device page in use belongs to exactly one live request, every host copy belongs
to a live request, and exactly the LOADING requests have a load in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import jax

from tfjax.kv.host import HostBlock, HostPage, HostTier
from tfjax.kv.pages import PAD_PAGE, PageAllocator, extra_pages
from tfjax.kv.prefix import PrefixCache
from tfjax.kv.transfer import TransferIO
from tfjax.request import Request, RequestStatus
from tfjax.sched.base import Costs, Plan, PlanError, ResumeMode

log = logging.getLogger(__name__)


class PageIO(Protocol):
    """The runner's jitted page copies (it owns the donated KV arrays)."""

    max_gather_pages: int
    page_bytes: int

    def gather(self, page_ids: Sequence[int]) -> jax.Array:
        """Fresh [L, 2, N, S, K, Dh] copy of `page_ids` (N = bucket >= len(page_ids))."""
        ...

    def scatter(self, page_ids: Sequence[int], pages: jax.Array) -> None:
        """Write `pages[:, :, i]` into device page `page_ids[i]`; the rest goes to PAD_PAGE."""
        ...


# Share of a step's time that write-through may spend copying where host copies run on the
# cores the step runs on (a CPU backend): there every copied byte slows the step, so copies
# ahead of a preemption are kept to a small, bounded tax; a preemption still copies its whole
# unsynced tail at once. Where a DMA engine copies beside the step, a whole step's worth.
SHARED_COMPUTE_COPY_SHARE = 0.02


@dataclass(slots=True)
class Offload:
    host: HostTier
    transfers: TransferIO
    io: PageIO
    write_through: bool = True
    overlap: bool = True
    copies_share_compute: bool = False  # host copies run on the step's cores (CPU backend)


@dataclass(slots=True)
class PendingLoad:
    """A LOADING request's H2D copies: (device array future, device page per block slot)."""

    request: Request
    parts: list[tuple[Future[jax.Array], list[int]]]
    started_s: float
    prefix_keys: frozenset[bytes] = frozenset()  # cached prefix pages this load brings back

    @property
    def arrived(self) -> bool:
        return all(future.done() for future, _ in self.parts)


@dataclass(frozen=True, slots=True)
class PrefillWork:
    request: Request
    num_tokens: int


@dataclass(frozen=True, slots=True)
class StepWork:
    prefill: tuple[PrefillWork, ...]
    decode: tuple[Request, ...]

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)


@dataclass(slots=True)
class KVStats:
    num_preemptions: int = 0
    num_swap_preemptions: int = 0  # KV kept on the host
    num_loads: int = 0  # completed
    num_recomputes: int = 0  # resumes by recompute
    num_host_full_fallbacks: int = 0
    preempt_s: float = 0.0  # total decision -> device pages free
    num_copied_pages: int = 0  # device pages queued for the host (write-through, preemption)
    copy_s: float = 0.0  # link seconds of those copies at the measured D2H bandwidth
    load_s: float = 0.0  # total resume decision -> pages scattered (off the engine thread)
    resume_s: float = 0.0  # total decision -> first token after resuming
    num_resumes_timed: int = 0


class KVManager:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        offload: Offload | None = None,
        *,
        swaps: bool = True,
        prefix: PrefixCache | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`swaps`: the policy can resume by LOAD, so KV copied to the host may be read back.
        `prefix`: share full pages between requests (None: `--no-prefix-cache`). `clock`
        times the load and resume latencies (the engine's, virtual in the simulator)."""
        self.clock = clock
        self.device = PageAllocator(num_pages)
        self.page_size = page_size
        self.offload = offload
        self.swaps = swaps
        self.prefix = prefix
        self._keys: dict[str, list[bytes]] = {}  # request -> chain keys of its full pages
        self._registered: dict[str, int] = {}  # request -> leading pages offered to the cache
        self.stats = KVStats()
        self._resumed_at: dict[str, float] = {}
        self._loads: dict[str, PendingLoad] = {}

    @property
    def host(self) -> HostTier | None:
        return self.offload.host if self.offload else None

    @property
    def num_free_pages(self) -> int:
        """Free plus evictable (cached, unreferenced) device pages: what a plan may use."""
        return self.device.num_free + (self.prefix.num_evictable if self.prefix else 0)

    def prefix_stats(self) -> dict[str, object]:
        """`EngineStats` fields of the prefix cache (none when it is off)."""
        if self.prefix is None:
            return {}
        stats = self.prefix.stats
        return dict(
            prefix_cache_queries=stats.num_queries,
            prefix_cache_query_tokens=stats.num_query_tokens,
            prefix_cache_hit_tokens={
                "device": stats.num_hit_tokens,
                "host": stats.num_host_hit_tokens,
            },
        )

    @property
    def num_used_pages(self) -> int:
        """Device pages live requests hold, shared pages counted once."""
        return self.device.num_used - (self.prefix.num_evictable if self.prefix else 0)

    def execute(
        self, plan: Plan, requests: Mapping[str, Request], costs: Costs | None = None
    ) -> StepWork:
        """Apply `plan`, which the engine validated (`tfjax.sched.base.validate_plan`); a
        `PlanError` here means the books disagree with the view, and the engine fails the step.
        `costs` (the plan's view's) decide whether a prefix found on the host is loaded."""
        if self.prefix:
            for request in requests.values():
                if request.status in (RequestStatus.PREFILLING, RequestStatus.RUNNING):
                    self._cache_full_pages(request)
        for request_id in plan.preempt:
            resident = (RequestStatus.PREFILLING, RequestStatus.RUNNING)
            self._preempt(self._get(requests, request_id, *resident))
        loading = set()  # resumed by LOAD in this plan: in no batch yet
        for resume in plan.resume:
            request = self._get(requests, resume.request_id, RequestStatus.PREEMPTED)
            if resume.mode is ResumeMode.LOAD:
                loading.add(request.request_id)
                if not self._load(request):
                    continue
            else:
                self.stats.num_recomputes += 1
                self._drop_kv(request)
                request.status = RequestStatus.PREFILLING
            self._resumed_at[request.request_id] = self.clock()
        for request_id in plan.admit:
            request = self._get(requests, request_id, RequestStatus.WAITING)
            request.status = RequestStatus.PREFILLING
        decode = []
        for request_id in plan.decode:
            if request_id in loading:
                continue
            request = self._get(requests, request_id, RequestStatus.RUNNING)
            if self._grow(request, request.num_tokens):
                decode.append(request)
        prefill = []
        for chunk in plan.prefill:
            if chunk.request_id in loading:
                continue
            request = self._get(requests, chunk.request_id, RequestStatus.PREFILLING)
            if not 0 < chunk.num_tokens <= request.num_uncomputed_prefill:
                raise PlanError(f"bad chunk {chunk} for {request.num_uncomputed_prefill} tokens")
            if self.prefix and request.num_computed_tokens == 0 and not request.page_ids:
                if not self._reuse_prefix(request, costs):
                    continue  # another request is loading its prefix: share it next step
                if request.status is RequestStatus.LOADING:
                    continue  # its host-cached prefix is on the way; it prefills after that
            num_tokens = self._fit(request, chunk.num_tokens)
            if num_tokens > 0:
                self._grow(request, request.num_computed_tokens + num_tokens)
                prefill.append(PrefillWork(request, num_tokens))
        return StepWork(prefill=tuple(prefill), decode=tuple(decode))

    def complete_loads(self) -> int:
        """Scatter every load whose pages have all arrived and hand the request back to the
        scheduler (RUNNING, or PREFILLING if it was preempted mid-prefill). Never waits."""
        arrived = [load for load in self._loads.values() if load.arrived]
        for load in arrived:
            assert self.offload is not None
            for future, pages in load.parts:
                self.offload.io.scatter(pages, future.result())
            request = load.request
            del self._loads[request.request_id]
            if not self.offload.write_through:  # write-back: swap-in frees the copy
                self.offload.host.drop(request.request_id, self._keys.get(request.request_id, ()))
            done = request.num_uncomputed_prefill == 0
            request.status = RequestStatus.RUNNING if done else RequestStatus.PREFILLING
            self.stats.num_loads += 1
            self.stats.load_s += self.clock() - load.started_s
        return len(arrived)

    def on_decoded(self, request: Request) -> None:
        """The request produced a token: close its resume-latency measurement if open."""
        start = self._resumed_at.pop(request.request_id, None)
        if start is not None:
            self.stats.resume_s += self.clock() - start
            self.stats.num_resumes_timed += 1

    def release(self, request: Request) -> None:
        """Free everything `request` holds on both tiers (it finished or was aborted); a load
        still in flight is forgotten, its arriving pages never scattered."""
        if self._loads.pop(request.request_id, None) is None and self.prefix:
            self._cache_full_pages(request)  # a finished turn's context serves the next one
        if self.host:
            self.host.drop(request.request_id, self._keys.get(request.request_id, ()))
        self._free_device_pages(request)
        self._keys.pop(request.request_id, None)
        self._resumed_at.pop(request.request_id, None)

    def write_through(self, running: Sequence[Request], now_s: float, step_s: float) -> int:
        """Queue copies of full, not yet copied pages of `running` to the host, largest
        virtual buffer first (the likeliest to be preempted next), one buffer per request, at
        most what the D2H link moves in the time the next step (`step_s`, estimated) leaves
        it: all of it beside a DMA engine, `SHARED_COMPUTE_COPY_SHARE` of it where copies take
        the step's own cores. Only when the policy can resume by LOAD. Returns pages queued."""
        if not (self.offload and self.offload.write_through and self.swaps):
            return 0
        host, link = self.offload.host, self.offload.transfers
        budget_s = step_s * (SHARED_COMPUTE_COPY_SHARE if self.offload.copies_share_compute else 1)
        budget_bytes = min(budget_s * link.d2h.bytes_per_s, link.room_bytes())
        max_pages = min(
            int(budget_bytes // self.offload.io.page_bytes), self.offload.io.max_gather_pages
        )
        if max_pages <= 0:
            return 0
        ps = self.page_size
        todo = [  # (request, first page not yet copied): only requests with a new full page
            (r, start)
            for r in running
            if (start := host.num_queued_tokens(r.request_id) // ps) < r.num_computed_tokens // ps
        ]
        queued = 0
        for request, start in sorted(todo, key=lambda item: -item[0].reader.buffer_s(now_s)):
            take = min(request.num_computed_tokens // ps - start, max_pages - queued)
            if self._copy_out(request, range(start, start + take)):
                queued += take
            if queued >= max_pages:
                break
        return queued

    def check(self, requests: Mapping[str, Request]) -> None:
        self.device.check()
        tables = [r.page_ids for r in requests.values()]
        owned = [p for table in tables for p in table]
        private = [p for p in owned if not (self.prefix and self.prefix.is_cached(p))]
        assert len(private) == len(set(private)), "a device page belongs to two requests"
        assert len(set(owned)) == self.num_used_pages, (
            f"requests own {len(set(owned))} pages, allocator says {self.num_used_pages} in use"
        )
        if self.prefix:
            self.prefix.check(tables)
            assert set(self._keys) <= set(requests), "prefix keys of a finished request"
        loading = {i for i, r in requests.items() if r.status is RequestStatus.LOADING}
        assert loading == set(self._loads), f"LOADING {loading}, loads in flight {set(self._loads)}"
        if self.host:
            self.host.check()
            assert set(self.host.copies) <= set(requests), "host copy of a finished request"

    # -- internals -------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        start = time.perf_counter()
        self.stats.num_preemptions += 1
        request.num_preemptions += 1
        if self.prefix:
            self._cache_full_pages(request)
        host = self.host if self.swaps else None
        if host is not None:
            first = host.num_queued_tokens(request.request_id) // self.page_size
            tail = range(first, len(request.page_ids))
            if not tail or self._copy_out(request, tail):
                self.stats.num_swap_preemptions += 1
            else:
                self.stats.num_host_full_fallbacks += 1
                log.warning(
                    "host KV pool full (%d pages free): %s will resume by recompute",
                    host.num_free_pages,
                    request.request_id,
                )
                self._drop_kv(request)
        else:
            self._drop_kv(request)
        self._free_device_pages(request)
        request.status = RequestStatus.PREEMPTED
        self.stats.preempt_s += time.perf_counter() - start

    def _copy_out(self, request: Request, pages: range) -> bool:
        """Gather `request`'s pages `pages` into one fresh buffer of its own and queue it for
        the host. False (nothing queued) when the padded buffer does not fit the host budget."""
        assert self.offload is not None
        host = self.offload.host
        if not host.make_room(len(pages)):
            return False
        gathered = self.offload.io.gather([request.page_ids[i] for i in pages])
        num_slots = gathered.shape[2]
        if not host.make_room(num_slots):
            return False
        block = HostBlock(self.offload.transfers.offload(gathered), num_slots, gathered.nbytes)
        host.add(request.request_id, block, pages, request.num_computed_tokens)
        self.stats.num_copied_pages += num_slots
        self.stats.copy_s += gathered.nbytes / self.offload.transfers.d2h.bytes_per_s
        return True

    def _load(self, request: Request) -> bool:
        """Start bringing `request`'s host copy back: fresh device pages now, one H2D copy per
        host block on the link's worker; `complete_loads` scatters them once all arrived.
        False if the pages are not there (prefix cache, see `_grow`): it stays PREEMPTED."""
        host, offload = self.host, self.offload
        if host is None or offload is None or not self.swaps:
            raise PlanError("resume by LOAD needs the host tier and a policy that loads")
        if host.num_synced_tokens(request.request_id) < request.num_computed_tokens:
            raise PlanError(f"{request.request_id}: host copy incomplete, cannot LOAD")
        if not self._grow(request, request.num_computed_tokens):
            return False
        self._start_load(request, host.copies[request.request_id].pages)
        return True

    def _start_load(
        self,
        request: Request,
        pages: Mapping[int, HostPage],
        prefix_keys: frozenset[bytes] = frozenset(),
    ) -> None:
        """Queue one H2D copy per host block holding `pages` (request page index -> copy) into
        the request's device pages; the request is LOADING until `complete_loads`.
        `prefix_keys`: the cached prefix pages among them, which others then wait for."""
        assert self.offload is not None
        targets: dict[int, tuple[HostBlock, list[int]]] = {}  # id(block) -> (block, pages)
        for index, page in pages.items():
            block, device_pages = targets.setdefault(
                id(page.block), (page.block, [PAD_PAGE] * page.block.num_slots)
            )
            device_pages[page.offset] = request.page_ids[index]
        after_evictions = not self.offload.overlap
        parts = [
            (self.offload.transfers.load(b.array, b.nbytes, after_evictions=after_evictions), p)
            for b, p in targets.values()
        ]
        self._loads[request.request_id] = PendingLoad(request, parts, self.clock(), prefix_keys)
        request.status = RequestStatus.LOADING

    def _drop_kv(self, request: Request) -> None:
        if self.host:
            self.host.drop(request.request_id, self._keys.get(request.request_id, ()))
        request.num_computed_tokens = 0

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Give `request` the pages `num_tokens` tokens need, reclaiming evictable cached pages
        when the free list runs short. Out of pages is a policy bug (`PlanError`), except with
        the prefix cache: policies count a preempted request's pages as freed, but pages it
        shares stay in use, so there a decode row that finds no page sits this step out
        (False) and the next plan sees the real free count."""
        need = extra_pages(request, num_tokens, self.page_size)
        if need == 0:
            return True
        if need > self.num_free_pages:
            if self.prefix:
                return False
            raise PlanError(f"{request.request_id} needs {need} pages, {self.num_free_pages} free")
        while self.prefix and self.device.num_free < need:
            self.device.free([self.prefix.evict()])
        request.page_ids.extend(self.device.allocate(need))
        return True

    def _fit(self, request: Request, num_tokens: int) -> int:
        """The planned chunk, cut to the prompt left after a prefix hit and, with the prefix
        cache (see `_grow`), to the pages there are."""
        num_tokens = min(num_tokens, request.num_uncomputed_prefill)
        if self.prefix:
            room = (len(request.page_ids) + self.num_free_pages) * self.page_size
            num_tokens = min(num_tokens, room - request.num_computed_tokens)
        return num_tokens

    def _free_device_pages(self, request: Request) -> None:
        """Drop `request`'s references: cached pages stay (evictable once unreferenced),
        private ones return to the free list."""
        private = [p for p in request.page_ids if not (self.prefix and self.prefix.release(p))]
        self.device.free(private)
        request.page_ids = []
        self._registered.pop(request.request_id, None)

    def _chain_keys(self, request: Request, num_pages: int) -> list[bytes]:
        """Prefix keys of `request`'s first `num_pages` full pages (kept: tokens never change)."""
        assert self.prefix is not None
        keys = self._keys.setdefault(request.request_id, [])
        if num_pages > len(keys):
            start = len(keys) * self.page_size
            tokens = request.token_ids[start : num_pages * self.page_size]
            keys.extend(
                self.prefix.chain(tokens, num_pages - len(keys), keys[-1] if keys else None)
            )
        return keys[:num_pages]

    def _cache_full_pages(self, request: Request) -> None:
        """Offer `request`'s newly completed full pages to the prefix cache."""
        assert self.prefix is not None
        num_full = min(request.num_computed_tokens // self.page_size, len(request.page_ids))
        done = self._registered.get(request.request_id, 0)
        if num_full > done:
            keys = self._chain_keys(request, num_full)
            for index in range(done, num_full):
                self.prefix.insert(keys[index], request.page_ids[index])
            self._registered[request.request_id] = num_full

    def _reuse_prefix(self, request: Request, costs: Costs | None) -> bool:
        """Start a prefill from scratch on the longest cached run of its full pages: those on
        the device are shared at once; the run continues with pages the host pool holds if
        loading them beats recomputing them (`costs`), and the request turns LOADING. The
        last token to prefill is always computed (it yields the next token).

        False, holding nothing, when the run continues with pages another request is loading
        from the host right now: the engine registers them on the device as soon as they
        land, so this request shares them a step later instead of loading its own copies
        (a burst on one evicted system prompt loads it once)."""
        assert self.prefix is not None
        target = request.num_prefill_target
        keys = self._chain_keys(request, (target - 1) // self.page_size)
        request.page_ids = self.prefix.acquire(keys)
        on_device = len(request.page_ids)
        if on_device < len(keys) and self._being_loaded(keys[on_device]):
            self._free_device_pages(request)
            return False
        self._registered[request.request_id] = on_device
        host_pages = self._host_prefix(keys[on_device:], costs)
        if host_pages and self._grow(request, (on_device + len(host_pages)) * self.page_size):
            loaded = frozenset(keys[on_device : on_device + len(host_pages)])
            self._start_load(request, dict(enumerate(host_pages, start=on_device)), loaded)
        else:
            host_pages = []
        request.num_computed_tokens = (on_device + len(host_pages)) * self.page_size
        stats = self.prefix.stats
        stats.num_queries += 1
        stats.num_query_tokens += target
        stats.num_hit_tokens += on_device * self.page_size
        stats.num_host_hit_tokens += len(host_pages) * self.page_size
        if not request.output_ids:
            request.num_cached_prompt_tokens = request.num_computed_tokens
        return True

    def _being_loaded(self, key: bytes) -> bool:
        return any(key in load.prefix_keys for load in self._loads.values())

    def _host_prefix(self, keys: Sequence[bytes], costs: Costs | None) -> list[HostPage]:
        """The host pool's run of `keys`, if the policy loads and a load beats a recompute."""
        if not (keys and self.host and self.swaps and costs):
            return []
        pages = self.host.cached_run(keys)
        num_tokens = len(pages) * self.page_size
        load_s = costs.io_backlog_s + costs.load_s(num_tokens)
        return pages if pages and load_s < costs.recompute_s(num_tokens) else []

    @staticmethod
    def _get(requests: Mapping[str, Request], request_id: str, *allowed: RequestStatus) -> Request:
        request = requests.get(request_id)
        if request is None or request.status not in allowed:
            state = request.status.value if request else "unknown"
            raise PlanError(f"{request_id} is {state}, expected {[s.value for s in allowed]}")
        return request
