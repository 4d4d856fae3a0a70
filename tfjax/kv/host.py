"""`HostTier`: which pages of which request have a copy in pinned host memory.

A request's host copy is a map from its page index to a `HostPage`: the host array that holds
the page (one array per gather, shared by every page gathered with it), the page's position in
that array, how many of its tokens the copy covers, and whether the copy has completed. A page
counts as host-resident only once its copy completed (its future is done).

Accounting: host pages are allocated from a `PageAllocator` sized from `--host-kv-gb` when a
copy is queued and freed when the request ends, resumes by recompute, or a newer copy of the
same page replaces an old one (the last page of a request is copied partially when it is
preempted and again once it is full). The arrays themselves are freed by the garbage collector
when no `HostPage` refers to them; on CUDA, PJRT serves pinned host memory from its own
preallocated pool (`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`), which is why we count pages instead of
managing one giant array.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import jax

from tfjax.kv.pages import PageAllocator


@dataclass(slots=True)
class HostPage:
    host_page_id: int
    array: Future[jax.Array]  # [L, 2, N, S, K, Dh] pinned_host, once done
    offset: int  # index of this page along N
    num_tokens: int  # tokens of the page this copy holds (< page size for a partial tail)


@dataclass(slots=True)
class HostCopy:
    pages: dict[int, HostPage] = field(default_factory=dict)  # request page index -> copy

    def covered_tokens(self, page_size: int, *, done_only: bool) -> int:
        """Tokens covered by the contiguous run of copied pages from page 0."""
        tokens, index = 0, 0
        while (page := self.pages.get(index)) is not None:
            if done_only and not page.array.done():
                break
            tokens = index * page_size + page.num_tokens
            if page.num_tokens < page_size:
                break
            index += 1
        return tokens


class HostTier:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.allocator = PageAllocator(num_pages, reserve_pad_page=False)
        self.page_size = page_size
        self.copies: dict[str, HostCopy] = {}

    # HostView (what policies see)
    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def num_synced_tokens(self, request_id: str) -> int:
        copy = self.copies.get(request_id)
        return copy.covered_tokens(self.page_size, done_only=True) if copy else 0

    def num_queued_tokens(self, request_id: str) -> int:
        """Tokens copied or being copied: where the next write-through starts."""
        copy = self.copies.get(request_id)
        return copy.covered_tokens(self.page_size, done_only=False) if copy else 0

    def can_hold(self, num_pages: int) -> bool:
        return self.allocator.can_allocate(num_pages)

    def add(
        self,
        request_id: str,
        array: Future[jax.Array],
        first_offset: int,
        page_index_range: range,
        num_tokens: int,
    ) -> None:
        """Register a queued copy of pages `page_index_range` (covering the request's first
        `num_tokens` tokens at most) stored from `first_offset` along the array's page axis."""
        copy = self.copies.setdefault(request_id, HostCopy())
        replaced = [copy.pages.pop(i).host_page_id for i in page_index_range if i in copy.pages]
        self.allocator.free(replaced)
        host_pages = self.allocator.allocate(len(page_index_range))
        for i, (index, host_page) in enumerate(zip(page_index_range, host_pages, strict=True)):
            tokens = min(self.page_size, num_tokens - index * self.page_size)
            copy.pages[index] = HostPage(host_page, array, first_offset + i, tokens)

    def drop(self, request_id: str) -> None:
        copy = self.copies.pop(request_id, None)
        if copy is not None:
            self.allocator.free([p.host_page_id for p in copy.pages.values()])

    def check(self) -> None:
        self.allocator.check()
        owned = sum(len(c.pages) for c in self.copies.values())
        assert owned == self.allocator.num_used, (
            f"host copies own {owned} pages, allocator says {self.allocator.num_used}"
        )
