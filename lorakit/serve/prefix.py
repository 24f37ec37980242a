"""`PrefixCache`: keys and values of prompt prefixes already prefilled, reused by later prompts.

Chat prompts repeat their beginning: the template's system turn, a tenant's instructions, the
few-shot examples of a task. Their keys and values are the same every time for the same model
and adapter, so computing them once and copying them into the next prefill skips that part of the
forward pass. This is vLLM's automatic prefix caching (Kwon et al., SOSP 2023, and its
`--enable-prefix-caching`), done here over whole blocks of host memory rather than a paged pool:

- A prompt is cut into blocks of `block` tokens. Block j's key is (adapter key, the id of block
  j-1, its tokens), so a key names exactly one prefix: two prompts share a block only when every
  token before it and in it is equal. Only whole blocks are stored.
- The adapter key says whose weights computed the values: a LoRA on any layer changes the
  hidden states, and so every later layer's keys and values, so each adapter has its own
  blocks. The engine keys an adapter by its name and the load that put its weights in the slot
  (`AdapterCache.weights_key`), so an adapter re-registered or reloaded with other weights never
  meets its old blocks; those are no longer reachable and age out.
- A block holds every layer's keys and values for its tokens, one tensor
  (layers, 2, kv heads, block, head dim). Blocks are evicted least recently used first when the
  total passes `max_bytes`.
- `match` never returns the whole prompt: the last token is always computed, because its logits
  pick the first generated token.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    id: int
    kv: torch.Tensor  # (layers, 2, kv heads, block, head dim)


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 8):
        if block < 1:
            raise ValueError(f"prefix cache block: got {block} tokens (expected >= 1)")
        self.max_bytes = max_bytes
        self.block = block
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self.nbytes = 0
        self.evictions = 0  # for /metrics, with the engine's count of reused tokens

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(self, adapter_key, tokens: list[int], blocks: int):
        """The first `blocks` block keys of `tokens` that are in the cache, in order."""
        parent = 0
        for j in range(blocks):
            key = (adapter_key, parent, tuple(tokens[j * self.block:(j + 1) * self.block]))
            entry = self._blocks.get(key)
            if entry is None:
                return
            yield key, entry
            parent = entry.id

    def match(self, adapter_key, tokens: list[int]) -> list[torch.Tensor]:
        """The blocks of the longest cached prefix of `tokens` shorter than `tokens`, in order,
        each (layers, 2, kv heads, block, head dim); empty when nothing matches."""
        usable = (len(tokens) - 1) // self.block
        chain = list(self._keys(adapter_key, tokens, usable))
        self._touch([key for key, _ in chain])
        return [entry.kv for _, entry in chain]

    def insert(self, adapter_key, tokens: list[int], kv_of) -> int:
        """Store the whole blocks of `tokens` not stored yet; `kv_of(start, end)` gives the keys
        and values (layers, 2, kv heads, end - start, head dim) of tokens[start:end]. Returns the
        number of blocks added."""
        if self.max_bytes <= 0:
            return 0
        parent, added, chain = 0, 0, []
        for j in range(len(tokens) // self.block):
            start, end = j * self.block, (j + 1) * self.block
            key = (adapter_key, parent, tuple(tokens[start:end]))
            entry = self._blocks.get(key)
            if entry is None:
                kv = kv_of(start, end).clone()
                entry = _Block(next(self._ids), kv)
                self._blocks[key] = entry
                self.nbytes += kv.numel() * kv.element_size()
                added += 1
            chain.append(key)
            parent = entry.id
        self._touch(chain)
        self._evict()
        return added

    def _touch(self, chain: list) -> None:
        """Mark a used chain most recent, its first block last: eviction then takes the deepest
        blocks of a prefix before the blocks they extend, which would be unreachable without them."""
        for key in reversed(chain):
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._blocks:
            _, entry = self._blocks.popitem(last=False)
            self.nbytes -= entry.kv.numel() * entry.kv.element_size()
            self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0
