"""`BatchKV`: one left-padded KV cache for the running batch, re-built when sequences join or leave.

The layout is transformers' own for batched generation: keys and values (B, H, L, D) per layer
in a `DynamicCache`, rows left-padded to a common length L, and a 2-D attention mask (B, L) with
0 on padding. Positions come from the mask (`cumsum - 1`, as `generate` computes them), so a
row's padding changes neither its positions nor, being masked out, its attention: each row
computes what it would alone.

Iteration-level scheduling (Orca, Yu et al. OSDI 2022) needs rows to join and leave between
steps. Joining prefills the newcomers as their own left-padded batch and concatenates the two
caches along the batch axis after padding both to the longer length; leaving selects the
remaining rows and trims columns that are padding in every row. Both copy the cache once, which
is simple and correct; a paged cache would avoid the copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) for a left-padded mask: 0, 1, 2... over real tokens, 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids (B, L), mask (B, L)), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _pad_kv(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, length, D), zeros on the left."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))


class BatchKV:
    """The running batch's cache and mask; row i belongs to the i-th running sequence."""

    def __init__(self) -> None:
        self.cache = None  # transformers DynamicCache, or None when no row is running
        self.mask: torch.Tensor | None = None  # (B, L) long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _set_kv(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(ddp_cache_data=kv)

    def join(self, cache, mask: torch.Tensor) -> None:
        """Append rows prefilled on their own (`cache` from that forward, `mask` (B', L'))."""
        if self.mask is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        kv = [(torch.cat([_pad_kv(k0, length), _pad_kv(k1, length)]),
               torch.cat([_pad_kv(v0, length), _pad_kv(v1, length)]))
              for (k0, v0), (k1, v1) in zip(self._kv(), [(l.keys, l.values) for l in cache.layers])]
        self.mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)),
                               F.pad(mask, (length - mask.shape[1], 0))])
        self._set_kv(kv)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then drop columns that are padding in all of them."""
        if not rows:
            self.cache, self.mask = None, None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.sum(0).nonzero()
        first = int(used[0]) if len(used) else mask.shape[1]
        self.mask = mask[:, first:]
        self._set_kv([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                      for k, v in self._kv()])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask (B, L+1), position ids (B, 1)) for one decode step of every row."""
        mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True)  # the next position = real tokens so far
        return mask, positions

    def advance(self, mask: torch.Tensor) -> None:
        """Record the decode step's mask after the model appended one column to the cache."""
        self.mask = mask

    def nbytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(k.numel() * k.element_size() * 2 for k, _ in self._kv())
