"""Causal-LM loss on supervised tokens, optionally computing the output head only there.

The usual loss (transformers' `ForCausalLMLoss`) projects every position onto the whole
vocabulary and then ignores the positions labelled -100. For instruction data most positions are
prompt, so `supervised_only=True` runs the decoder, picks the hidden states whose next token is
supervised, and applies the output head to those alone: the same loss (a test checks it), less
work and memory. Models that post-process logits (soft-capping, logit scale) take the full path.

Both paths return the *sum* of token losses and the token count, so gradient accumulation can
weight every supervised token equally across micro-batches.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _head_is_plain(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return (cfg is not None and hasattr(model, "get_output_embeddings")
            and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None
            and getattr(cfg, "logits_scaling", None) is None
            and hasattr(model, "base_model") and model.base_model is not model)


def causal_lm_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor, supervised_only: bool = True
                       ) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over supervised next tokens, number of those tokens)."""
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = targets != -100
    n_tokens = int(mask.sum())
    if supervised_only and _head_is_plain(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][mask]  # (N, H)
        logits = model.get_output_embeddings()(picked)  # (N, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[:, :-1][mask]  # (N, V)
    loss_sum = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss_sum, n_tokens
