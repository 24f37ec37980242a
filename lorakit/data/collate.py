"""Right-padded batches of encoded examples: input ids, labels (-100 on padding), attention mask."""

from __future__ import annotations

import torch

from lorakit.data.render import IGNORE, Encoded


def pad_batch(encoded: list[Encoded], pad_id: int, pad_to_multiple_of: int | None = None
              ) -> dict[str, torch.Tensor]:
    longest = max(len(e.input_ids) for e in encoded)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
