"""Learning-rate schedule: linear warmup, then cosine decay, as a pure function of the step.

The shape is the one Loshchilov & Hutter (SGDR) and most LLM recipes use (nanoGPT's `get_lr`):
warm up linearly from 0 to `lr` over `warmup_steps`, then follow half a cosine down to
`lr * min_lr_ratio` at `total_steps`. A pure function makes resume exact: the rate at step k
depends on k alone.
"""

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
