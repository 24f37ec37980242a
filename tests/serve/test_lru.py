"""LruTier against a plain reference model, on random operation sequences (seeded)."""

import random

import pytest

from lorakit.serve.lru import LruTier, TierFull


class ReferenceLru:
    """The policy written the obvious way: a use clock per key; evict the smallest clock among
    keys that are neither pinned nor in use."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.clock = 0
        self.last_use = {}
        self.pinned = set()
        self.refs = {}

    def _tick(self, key):
        self.clock += 1
        self.last_use[key] = self.clock

    def add(self, key):
        if key in self.last_use:
            self._tick(key)
            return None
        evicted = None
        if len(self.last_use) >= self.capacity:
            free = [k for k in self.last_use if k not in self.pinned and not self.refs.get(k)]
            if not free:
                raise TierFull
            evicted = min(free, key=self.last_use.get)
            self.remove(evicted)
        self._tick(key)
        return evicted

    def touch(self, key):
        if key in self.last_use:
            self._tick(key)
            return True
        return False

    def remove(self, key):
        self.last_use.pop(key, None)
        self.pinned.discard(key)
        self.refs.pop(key, None)

    def keys(self):
        return sorted(self.last_use, key=self.last_use.get)


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_on_random_operations(seed):
    rng = random.Random(seed)
    capacity = rng.randint(1, 5)
    tier, ref = LruTier(capacity), ReferenceLru(capacity)
    keys = [f"k{i}" for i in range(capacity + 4)]
    evictions = 0
    for _ in range(400):
        op, key = rng.choice(["add", "add", "add", "touch", "pin", "unpin", "acquire", "release",
                              "remove"]), rng.choice(keys)
        if op == "add":
            try:
                want = ref.add(key)
            except TierFull:
                with pytest.raises(TierFull):
                    tier.add(key)
                continue
            got = tier.add(key)
            assert got == want
            evictions += want is not None
        elif op == "touch":
            assert tier.touch(key) == ref.touch(key)
        elif op == "pin" and key in ref.last_use:
            tier.pin(key)
            ref.pinned.add(key)
        elif op == "unpin":
            tier.unpin(key)
            ref.pinned.discard(key)
        elif op == "acquire" and key in ref.last_use:
            tier.acquire(key)
            ref.refs[key] = ref.refs.get(key, 0) + 1
        elif op == "release" and ref.refs.get(key):
            tier.release(key)
            ref.refs[key] -= 1
        elif op == "remove":
            tier.remove(key)
            ref.remove(key)
        assert tier.keys() == ref.keys()
        assert len(tier) <= capacity
        for k in keys:
            assert tier.pinned(k) == (k in ref.pinned)
            assert tier.in_use(k) == ref.refs.get(k, 0)
    assert tier.evictions == evictions


def test_full_of_pinned_or_used_keys_refuses_and_changes_nothing():
    tier = LruTier(2)
    tier.add("a")
    tier.add("b")
    tier.pin("a")
    tier.acquire("b")
    with pytest.raises(TierFull):
        tier.add("c")
    assert tier.keys() == ["a", "b"] and tier.victim() is None
    tier.release("b")
    assert tier.add("c") == "b" and tier.keys() == ["a", "c"]
    with pytest.raises(KeyError):
        tier.release("c")
