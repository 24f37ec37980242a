"""Which examples go in which micro-batch: a pure function of (seed, epoch).

Each epoch shuffles the examples with its own seeded generator. With `group_by_length`, the
shuffled order is cut into windows of 64 batches, each window sorted by length and cut into
batches, and the batches shuffled again: padding drops a lot while every epoch still visits every
example once in a random order (the "length-grouped sampler" of transformers' Trainer, made pure).

The trainer's data position is then one integer, the global micro-batch index, which makes resume
exact: micro-batch g is batch g % B of epoch g // B, whatever happened before.
"""

from __future__ import annotations

import torch

WINDOW_BATCHES = 64


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool, shuffle: bool = True,
                  members: list[int] | None = None) -> list[list[int]]:
    """The micro-batches (lists of example indices) of one epoch.

    With `shuffle=False` the examples keep their order and `group_by_length` is not applied
    (benchmarks use it to feed two trainers the same batches). `members` are the indices this
    epoch trains on (default: every example once; `lorakit.data.mix` adds drawn mixed rows).
    """
    members = list(range(len(lengths))) if members is None else members
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()] if shuffle \
        else list(members)
    if not group_by_length or not shuffle:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


class BatchPlan:
    """Maps a global micro-batch index to its examples, caching one epoch at a time."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 shuffle: bool = True, members=None):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.group_by_length, self.shuffle = group_by_length, shuffle
        self.members = members  # epoch -> example indices (a constant count), or None: all once
        size = len(members(0)) if members is not None else len(lengths)
        self.per_epoch = (size + batch_size - 1) // batch_size
        self._epoch, self._batches = -1, []

    def __getitem__(self, g: int) -> list[int]:
        epoch, idx = divmod(g, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch,
                                          self.group_by_length, self.shuffle,
                                          self.members(epoch) if self.members is not None else None)
        return self._batches[idx]

    def epoch_of(self, g: int) -> float:
        return g / self.per_epoch
