"""`LruTier`: the bookkeeping of one cache tier (CPU adapters, or active slots), without tensors.

The policy is vLLM's LoRA model manager's (`LRUCacheLoRAModelManager`): a bounded set of keys
kept in least-recently-used order; adding to a full tier evicts the least recently used key that
may go. A key may not go while it is pinned (an operator asked to keep it) or in use (a running
request holds a reference, counted by `acquire`/`release`). When every key is pinned or in use,
`add` refuses with `TierFull` and the caller waits (the scheduler leaves the request queued).

Kept free of tensors so a property test can run thousands of random operations against a plain
reference model (tests/serve/test_lru.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class TierFull(Exception):
    """Every key in the tier is pinned or in use, so nothing can be evicted."""


class LruTier:
    """Keys in least-recently-used order, with pins and in-use reference counts."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"tier capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # first = least recently used
        self._pinned: set[Hashable] = set()
        self._refs: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def keys(self) -> list[Hashable]:
        """Resident keys, least recently used first."""
        return list(self._order)

    def touch(self, key: Hashable) -> bool:
        """Mark `key` most recently used; True if it was resident (a hit), else count a miss."""
        if key in self._order:
            self._order.move_to_end(key)
            self.hits += 1
            return True
        self.misses += 1
        return False

    def evictable(self, key: Hashable) -> bool:
        return key not in self._pinned and self._refs.get(key, 0) == 0

    def victim(self) -> Hashable | None:
        """The key `add` would evict next: the least recently used one not pinned and not in use."""
        for key in self._order:
            if self.evictable(key):
                return key
        return None

    def add(self, key: Hashable) -> Hashable | None:
        """Insert `key` as most recently used; return the key evicted to make room, if any.

        Raises `TierFull` (changing nothing) when the tier is full and no key may be evicted.
        """
        if key in self._order:
            self._order.move_to_end(key)
            return None
        evicted = None
        if len(self._order) >= self.capacity:
            evicted = self.victim()
            if evicted is None:
                raise TierFull(f"all {self.capacity} entries are pinned or in use")
            self.remove(evicted)
            self.evictions += 1
        self._order[key] = None
        return evicted

    def remove(self, key: Hashable) -> None:
        """Drop `key` (no-op when absent); its pin and reference count go with it."""
        self._order.pop(key, None)
        self._pinned.discard(key)
        self._refs.pop(key, None)

    def pin(self, key: Hashable) -> None:
        if key not in self._order:
            raise KeyError(key)
        self._pinned.add(key)

    def unpin(self, key: Hashable) -> None:
        self._pinned.discard(key)

    def pinned(self, key: Hashable) -> bool:
        return key in self._pinned

    def acquire(self, key: Hashable) -> None:
        """A running request starts using `key`: it may not be evicted until released."""
        if key not in self._order:
            raise KeyError(key)
        self._refs[key] = self._refs.get(key, 0) + 1

    def release(self, key: Hashable) -> None:
        count = self._refs.get(key, 0)
        if count <= 0:
            raise KeyError(f"{key!r} released more often than acquired")
        if count == 1:
            del self._refs[key]
        else:
            self._refs[key] = count - 1

    def in_use(self, key: Hashable) -> int:
        return self._refs.get(key, 0)
