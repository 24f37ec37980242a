"""Deduplication and a seeded train/validation split.

Duplicates are compared on normalised text (case-folded, whitespace collapsed) across the whole
conversation, keeping the first occurrence. The split is seeded and, when every example has a
label and each label has enough rows, stratified so the validation share sees every class.
"""

from __future__ import annotations

import random

from lorakit.data.formats import Example


def _key(ex: Example) -> tuple:
    return tuple((m["role"], " ".join(m["content"].casefold().split())) for m in ex.messages)


def dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    """(examples without exact normalised duplicates, how many were removed)."""
    seen, kept = set(), []
    for ex in examples:
        k = _key(ex)
        if k not in seen:
            seen.add(k)
            kept.append(ex)
    return kept, len(examples) - len(kept)


def train_val_split(examples: list[Example], val_fraction: float, seed: int
                    ) -> tuple[list[Example], list[Example]]:
    """A seeded split; stratified by label when labels are categorical (each class >= 2 rows)."""
    rng = random.Random(seed)
    if not 0 < val_fraction < 1 or len(examples) < 2:
        return list(examples), []
    groups: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.label, []).append(i)
    categorical = len(groups) <= max(2, len(examples) // 10) and all(len(g) >= 2 for g in groups.values())
    val_idx: set[int] = set()
    if categorical:
        for label in sorted(groups, key=str):
            idx = groups[label][:]
            rng.shuffle(idx)
            val_idx.update(idx[:max(1, round(val_fraction * len(idx)))])
    else:
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        val_idx.update(idx[:max(1, round(val_fraction * len(idx)))])
    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val
