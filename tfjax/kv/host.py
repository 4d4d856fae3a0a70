"""`HostTier`: which pages of which request have a copy in pinned host memory.

Every copy to the host is one `HostBlock`: the array one gather produced (its page axis padded
to the gather bucket) and the future of its device-to-host copy. Gathers are per request, so a
block holds one request's pages and a resume moves only that request's bytes. A request's host
copy maps its page index to a `HostPage` (block, position in the block, tokens it covers). A
page counts as host-resident only once its block's copy completed (its future is done).

Accounting is in page slots of held blocks, padding included: a block occupies its whole
padded page axis from the moment its copy is queued until no `HostPage` refers to it (the
request ended, resumed by recompute, or newer copies replaced all its pages: the last page of
a request is copied partially when it is preempted and again once it is full). Every page has
the same byte size, so slots times `page_bytes` are the bytes actually held, and the budget
from `--host-kv-gb` bounds them.

Second level of the prefix cache (`cached`): when a request's host copy is dropped, its full
pages named by a prefix key stay, least recently used first, so a prefix evicted from the
device comes back by a copy instead of a recompute. They share the budget with the requests'
copies and are evicted (`make_room`) whenever a copy needs the slots.

The arrays themselves are freed by the garbage collector once unreferenced; on CUDA, PJRT
serves pinned host memory from its own preallocated pool (`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`),
which is why we count slots instead of managing one giant array.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import jax


@dataclass(slots=True, eq=False)
class HostBlock:
    """One gathered array on its way to (or in) pinned host memory."""

    array: Future[jax.Array]  # [L, 2, N, S, K, Dh] pinned_host, once done
    num_slots: int  # N: pages held, padding included
    nbytes: int  # of the whole array (what a load moves)
    num_refs: int = 0  # `HostPage`s that point here
    num_pool_refs: int = 0  # of which in the prefix pool

    @property
    def pool_only(self) -> bool:
        return self.num_refs > 0 and self.num_pool_refs == self.num_refs

    @property
    def done(self) -> bool:
        return self.array.done()


@dataclass(slots=True)
class HostPage:
    block: HostBlock
    offset: int  # index of this page along the block's page axis
    num_tokens: int  # tokens of the page this copy holds (< page size for a partial tail)


@dataclass(slots=True)
class HostCopy:
    pages: dict[int, HostPage] = field(default_factory=dict)  # request page index -> copy
    # Leading full pages already found copied (queued / completed): `covered_tokens` resumes
    # its walk there, so asking every step costs the new pages only, not the whole copy.
    _queued_run: int = 0
    _done_run: int = 0

    def replace_from(self, first: int) -> None:
        """Pages from index `first` on are being replaced by new copies."""
        self._queued_run = min(self._queued_run, first)
        self._done_run = min(self._done_run, first)

    def covered_tokens(self, page_size: int, *, done_only: bool) -> int:
        """Tokens covered by the contiguous run of copied pages from page 0."""
        index = self._done_run if done_only else self._queued_run
        tokens = index * page_size
        while (page := self.pages.get(index)) is not None:
            if done_only and not page.block.done:
                break
            tokens = index * page_size + page.num_tokens
            if page.num_tokens < page_size:
                break
            index += 1
        if done_only:
            self._done_run = index
        else:
            self._queued_run = index
        return tokens


class HostTier:
    def __init__(self, num_pages: int, page_size: int) -> None:
        """`num_pages`: the budget in page slots (`--host-kv-gb` // page bytes)."""
        if num_pages < 1:
            raise ValueError(f"the host tier needs at least one page, got {num_pages}")
        self.num_total_pages = num_pages
        self.page_size = page_size
        self.num_used_pages = 0  # slots of live blocks, padding included
        self.num_pool_pages = 0  # of which in blocks only the prefix pool refers to
        self.copies: dict[str, HostCopy] = {}
        self.cached: OrderedDict[bytes, HostPage] = OrderedDict()  # prefix key -> page, LRU

    @property
    def num_request_pages(self) -> int:
        """Slots held for live requests' copies (the pool's own blocks left out)."""
        return self.num_used_pages - self.num_pool_pages

    # HostView (what policies see)
    @property
    def num_free_pages(self) -> int:
        return self.num_total_pages - self.num_used_pages

    def num_synced_tokens(self, request_id: str) -> int:
        copy = self.copies.get(request_id)
        return copy.covered_tokens(self.page_size, done_only=True) if copy else 0

    def num_queued_tokens(self, request_id: str) -> int:
        """Tokens copied or being copied: where the next write-through starts."""
        copy = self.copies.get(request_id)
        return copy.covered_tokens(self.page_size, done_only=False) if copy else 0

    def can_hold(self, num_slots: int) -> bool:
        return num_slots <= self.num_free_pages

    def add(
        self, request_id: str, block: HostBlock, page_index_range: range, num_tokens: int
    ) -> None:
        """Register a queued copy of the request's pages `page_index_range` (covering its
        first `num_tokens` tokens at most), stored from offset 0 of the fresh `block`. The
        caller checked `can_hold(block.num_slots)`."""
        if not self.can_hold(block.num_slots):
            raise ValueError(f"{block.num_slots} host slots asked, {self.num_free_pages} free")
        self.num_used_pages += block.num_slots
        copy = self.copies.setdefault(request_id, HostCopy())
        copy.replace_from(page_index_range.start)
        self._unref(copy.pages.pop(i) for i in page_index_range if i in copy.pages)
        for offset, index in enumerate(page_index_range):
            tokens = min(self.page_size, num_tokens - index * self.page_size)
            copy.pages[index] = HostPage(block, offset, tokens)
            self._count(block, refs=1)

    def drop(self, request_id: str, keys: Sequence[bytes] = ()) -> None:
        """Forget `request_id`'s copy; its full pages `keys` names (page i has `keys[i]`) move
        to the prefix pool unless the pool has those keys already."""
        copy = self.copies.pop(request_id, None)
        if copy is None:
            return
        for index, page in copy.pages.items():
            if (
                index < len(keys)
                and page.num_tokens == self.page_size
                and keys[index] not in self.cached
            ):
                self.cached[keys[index]] = page
                self._count(page.block, pool_refs=1)
            else:
                self._unref([page])

    def cached_run(self, keys: Sequence[bytes]) -> list[HostPage]:
        """Completed pool pages of the longest run of `keys` (marked recently used)."""
        pages = []
        for key in keys:
            page = self.cached.get(key)
            if page is None or not page.block.done:
                break
            self.cached.move_to_end(key)
            pages.append(page)
        return pages

    def make_room(self, num_slots: int) -> bool:
        """Evict pool pages, least recently used first, until `num_slots` slots are free."""
        while not self.can_hold(num_slots) and self.cached:
            self._count(self.cached.popitem(last=False)[1].block, refs=-1, pool_refs=-1)
        return self.can_hold(num_slots)

    def check(self) -> None:
        live = [*(p for c in self.copies.values() for p in c.pages.values()), *self.cached.values()]
        blocks = {id(p.block): p.block for p in live}
        refs: dict[int, int] = {}
        for page in live:
            refs[id(page.block)] = refs.get(id(page.block), 0) + 1
        pool_refs: dict[int, int] = {}
        for page in self.cached.values():
            pool_refs[id(page.block)] = pool_refs.get(id(page.block), 0) + 1
        for key, block in blocks.items():
            assert block.num_refs == refs[key], (
                f"host block has {block.num_refs} refs, not {refs[key]}"
            )
            assert block.num_pool_refs == pool_refs.get(key, 0), "host pool refs disagree"
        pool_only = sum(b.num_slots for b in blocks.values() if b.pool_only)
        assert pool_only == self.num_pool_pages, (
            f"pool holds {pool_only}, not {self.num_pool_pages}"
        )
        held = sum(b.num_slots for b in blocks.values())
        assert held == self.num_used_pages, (
            f"host blocks hold {held} page slots, the books say {self.num_used_pages}"
        )
        assert self.num_used_pages <= self.num_total_pages, "host budget exceeded"

    def _unref(self, pages: Iterable[HostPage]) -> None:
        """Drop request-copy references (not the pool's)."""
        for page in list(pages):
            self._count(page.block, refs=-1)

    def _count(self, block: HostBlock, *, refs: int = 0, pool_refs: int = 0) -> None:
        """Change `block`'s references and keep the slot books in step."""
        was_pool_only = block.pool_only
        block.num_refs += refs
        block.num_pool_refs += pool_refs
        self.num_pool_pages += block.num_slots * (block.pool_only - was_pool_only)
        if block.num_refs == 0:
            self.num_used_pages -= block.num_slots
