"""The output head gets its input contiguous, so the product over the vocabulary stays one matmul.

Generation keeps only the last position's logits (`logits_to_keep=1`), and the model hands its
head `hidden[:, -1:, :]`: a (B, 1, D) view with strides (T*D, D, 1). When the head's weight does
not require grad (a frozen base: serving, a merged model, evaluation after LoRA training),
PyTorch's `matmul` folds a 3-D input into one (B*T, D) product only if it can view it that way;
this slice it cannot, so `F.linear` takes the batched path, broadcasting the (V, D) head to
(B, D, V), and on the CPU in bf16 that path copies the whole head once per row
(pytorch/pytorch#151934). For SmolLM2's 49,152 x 576 head and 16 rows: 2.0 s instead of 7 ms
(fp32: about 100 ms instead of 15). Every batched prefill pays it: the serving engine's, the
classification evaluation's, `generate`'s. Copying the (B, 1, D) slice first costs microseconds.
"""

from __future__ import annotations

import torch
from torch import nn


def contiguous_head_input(model: nn.Module) -> None:
    """Make `model`'s output head copy a non-contiguous input before its product. Idempotent; a
    model without `get_output_embeddings` (or without a head) is left as it is."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_lorakit_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_input)
    head._lorakit_contiguous_input = True


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None
