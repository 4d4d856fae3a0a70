"""Page arithmetic, and the bookkeeping of one KV tier: a free list and a used set, no arrays.

`PageAllocator` only keeps books; the arrays live in `tfjax.runner.Runner` (device tier) and
`tfjax.kv.host.HostTier` (host tier). It is pure Python so the scheduler simulator reuses it.

Invariants (checked by `check`): every page in [first_page, num_pages) is either free or
used, never both; `num_free + num_used == num_usable`. On the device tier page 0 is
`PAD_PAGE`, the target of padded writes, and is never handed out.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

PAD_PAGE = 0


class HoldsPages(Protocol):
    page_ids: list[int]


def pages_needed(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens: the one page arithmetic of the engine, the packer,
    the policies and the checks."""
    return -(-num_tokens // page_size)


def extra_pages(holder: HoldsPages, num_tokens: int, page_size: int) -> int:
    """Pages `holder` must still get so that `num_tokens` tokens fit (page 0, the padding
    page, is never handed out: the allocator keeps it)."""
    return max(0, pages_needed(num_tokens, page_size) - len(holder.page_ids))


class OutOfPagesError(RuntimeError):
    """An allocation asked for more pages than are free: the caller's plan was wrong."""


class PageAllocator:
    def __init__(self, num_pages: int, *, reserve_pad_page: bool = True) -> None:
        first = 1 if reserve_pad_page else 0
        if num_pages <= first:
            raise ValueError(f"need more than {first} pages, got {num_pages}")
        self.num_pages = num_pages
        self.first_page = first
        self._free: deque[int] = deque(range(first, num_pages))
        self._used: set[int] = set()

    @property
    def num_usable(self) -> int:
        return self.num_pages - self.first_page

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        if num > len(self._free):
            raise OutOfPagesError(f"asked for {num} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if page not in self._used:
                raise ValueError(f"page {page} freed but not in use (double free?)")
            self._used.remove(page)
            self._free.append(page)

    def check(self) -> None:
        """Raise AssertionError if the books do not balance."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not (free & self._used), "a page is both free and used"
        assert len(free) + len(self._used) == self.num_usable, (
            f"free {len(free)} + used {len(self._used)} != total {self.num_usable}"
        )
