"""Causal-LM loss on supervised tokens, optionally computing the output head only there.

The usual loss (transformers' `ForCausalLMLoss`) projects every position onto the whole
vocabulary and then ignores the positions labelled -100. For instruction data most positions are
prompt, so `supervised_only=True` runs the decoder, picks the hidden states whose next token is
supervised, and applies the output head to those alone: the same loss (a test checks it), less
work and memory. Models that post-process logits (soft-capping, logit scale) take the full path.

Both paths return the *sum* of token losses and the token count, so gradient accumulation can
weight every supervised token equally across micro-batches.

Long answers make even the supervised positions many: 4,000 of them times a 49,152-token
vocabulary is 800 MB per fp32 logits tensor, and autograd keeps several. The supervised path
therefore runs the head and the loss in chunks of `chunk_rows` positions under activation
checkpointing (the idea of Liger's fused linear cross-entropy): each chunk's logits are freed
after its loss and recomputed in the backward pass, so memory stays at one chunk.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.render import IGNORE

CHUNK_ROWS = 1024


def _head_is_plain(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (cfg is not None and hasattr(model, "get_output_embeddings")
            and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None
            and getattr(cfg, "logits_scaling", None) is None
            and hasattr(model, "base_model") and model.base_model is not model)


def _head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")  # (N, V) logits inside


def chunked_head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden[i]), targets[i]), one chunk of logits at a time."""
    if hidden.shape[0] <= chunk_rows:
        return _head_loss_sum(head, hidden, targets)
    parts = [checkpoint(_head_loss_sum, head, hidden[s:s + chunk_rows], targets[s:s + chunk_rows],
                        use_reentrant=False)
             for s in range(0, hidden.shape[0], chunk_rows)]
    return torch.stack(parts).sum()


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor, supervised_only: bool = True,
                       chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over supervised next tokens, number of those tokens)."""
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != -100
    n_tokens = int(mask.sum())
    if supervised_only and _head_is_plain(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][mask]  # (N, H)
        return chunked_head_loss_sum(model.get_output_embeddings(), picked, targets[mask],
                                     chunk_rows), n_tokens
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False).logits[:, :-1][mask]  # (N, V)
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum"), n_tokens


def packed_loss_sum(model: nn.Module, batch, supervised_only: bool = True,
                    chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """`causal_lm_loss_sum` for a `lorakit.train.packing.PackedBatch` (padding-free row).

    The model must be in `packed_attention_mode`; the targets are already shifted per example."""
    mask = batch.targets != IGNORE
    n_tokens = int(mask.sum())
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False,
              "lorakit_packing": batch.info}
    if supervised_only and _head_is_plain(model):
        hidden = model.base_model(**inputs).last_hidden_state[0]  # (N, H)
        return chunked_head_loss_sum(model.get_output_embeddings(), hidden[mask],
                                     batch.targets[mask], chunk_rows), n_tokens
    logits = model(**inputs).logits[0][mask]  # (N, V)
    return F.cross_entropy(logits.float(), batch.targets[mask], reduction="sum"), n_tokens
