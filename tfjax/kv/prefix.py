"""`PrefixCache`: full device pages shared between requests by the tokens they hold.

A full page is named by a hash chain: its key hashes the previous page's key and its own token
ids, and the chain starts from the model identity, so equal keys mean the same tokens at the
same positions under the same weights, hence the same K/V (vLLM's automatic prefix caching).
Only full pages are cached: a page still being written belongs to one request, so no page is
ever written while shared and no copy-on-write exists.

Books (pure Python, like `PageAllocator`; the pages themselves stay allocated in the device
allocator while cached):
- `refs[page]`: how many live requests list the cached page in their page table.
- `evictable`: cached pages no request uses, least recently used first. The scheduler counts
  them as free; `KVManager` reclaims them on demand, before any allocation fails.
A page is cached under one key at most, and a key names one page at most: a request that
computed a page another request cached meanwhile keeps its copy private.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class PrefixStats:
    num_queries: int = 0  # lookups (one per prefill from scratch)
    num_query_tokens: int = 0  # prompt tokens those lookups could have hit
    num_hit_tokens: int = 0  # tokens served from cached device pages
    num_host_hit_tokens: int = 0  # tokens loaded back from cached host pages


class PrefixCache:
    def __init__(self, page_size: int, model_id: str) -> None:
        self.page_size = page_size
        self.root = hashlib.blake2b(model_id.encode(), digest_size=16).digest()
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self.refs: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixStats()

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    def chain(
        self, tokens: Sequence[int], num_pages: int, parent: bytes | None = None
    ) -> list[bytes]:
        """Keys of the `num_pages` full pages of `tokens`, continuing the chain at `parent`
        (the key of the page before `tokens[0]`; the root for page 0)."""
        keys, key, ps = [], parent or self.root, self.page_size
        for i in range(num_pages):
            page = np.asarray(tokens[i * ps : (i + 1) * ps], np.int64)
            key = hashlib.blake2b(key + page.tobytes(), digest_size=16).digest()
            keys.append(key)
        return keys

    def acquire(self, keys: Sequence[bytes]) -> list[int]:
        """Device pages of the longest cached run of `keys`, each with one more reference."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            self._ref(page)
            pages.append(page)
        return pages

    def insert(self, key: bytes, page: int) -> bool:
        """Cache `page` (full, just computed, referenced by its one owner) under `key`. False
        if the key is cached already (the page stays private) or the page already is."""
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        self.refs[page] = 1
        return True

    def release(self, page: int) -> bool:
        """Drop one reference to `page`. False if it is not cached (the caller frees it)."""
        if page not in self._key_of:
            return False
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self.evictable[page] = None  # most recently used last
        return True

    def evict(self) -> int:
        """Forget the least recently used unreferenced page; the caller frees it."""
        page, _ = self.evictable.popitem(last=False)
        del self._page_of[self._key_of.pop(page)], self.refs[page]
        return page

    def check(self, page_tables: Iterable[Sequence[int]]) -> None:
        """Reference counts equal the page tables' listings; unreferenced = evictable."""
        listed: dict[int, int] = {}
        for table in page_tables:
            for page in table:
                listed[page] = listed.get(page, 0) + 1
        for page, key in self._key_of.items():
            assert self._page_of[key] == page, f"page {page} and its key disagree"
            count = listed.get(page, 0)
            assert self.refs[page] == count, f"page {page}: {self.refs[page]} refs, {count} users"
            assert (count == 0) == (page in self.evictable), f"page {page}: evictable mismatch"
        assert len(self._page_of) == len(self._key_of) == len(self.refs)
        assert set(self.evictable) <= set(self._key_of), "an evictable page is not cached"

    def _ref(self, page: int) -> None:
        self.evictable.pop(page, None)
        self.refs[page] += 1
