"""Held-out loss and perplexity on the supervised (answer) tokens only.

Each example is rendered exactly as for training (`lorakit.data.render.encode_example`: the
chat template, labels -100 everywhere but the answer and its end-of-turn token), so the number is
the training objective on unseen rows. The loss is a token-weighted mean over the whole set,

    loss = sum over every supervised token of -log p(token | prefix) / number of those tokens,

not a mean of per-batch means (which would weight a short answer in a small batch more than a
long one), and perplexity = exp(loss) as in the HF "Perplexity of fixed-length models" guide.
The per-token sums come from `lorakit.train.loss.causal_lm_loss_sum`, the function training uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorakit.errors import DataError, LorakitError


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its eos (masked either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LorakitError("the tokenizer has neither a pad nor an eos token (expected one to pad batches)")


@torch.no_grad()
def supervised_loss(model, tokenizer, examples, max_seq_len: int = 512, batch_size: int = 8,
                    on_rows: Callable[[int], None] | None = None) -> dict:
    """Mean cross-entropy over the supervised tokens of `examples` (a list of `Example`).

    Returns {loss, perplexity, tokens, examples, answers_truncated, answers_dropped}: `tokens` is
    the number of supervised tokens scored; answers cut by `max_seq_len` are scored on what is
    left and counted in `answers_truncated`; answers cut away entirely add no tokens and are
    counted in `answers_dropped`. `on_rows(n)` is called after each batch (progress bars).
    """
    from lorakit.data.collate import pad_batch
    from lorakit.data.render import encode_example
    from lorakit.train.loss import causal_lm_loss_sum

    if not examples:
        raise DataError("supervised_loss: no examples (expected at least one row to score)")
    if batch_size < 1:
        raise LorakitError(f"supervised_loss: batch_size is {batch_size} (expected >= 1)")
    encoded = [encode_example(ex, tokenizer, max_seq_len) for ex in examples]
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    # Similar lengths share a batch so little compute goes to padding; the sum does not depend on order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    loss_sum, n_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([encoded[i] for i in idx], pad_id).items()}
            s, n = causal_lm_loss_sum(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
            loss_sum += float(s)
            n_tokens += n
            if on_rows is not None:
                on_rows(len(idx))
    finally:
        model.train(was_training)
    if n_tokens == 0:
        first = examples[0]
        raise DataError(f"{first.source}: no answer token is left to score in {len(examples)} rows "
                        f"(every answer was cut by max_seq_len={max_seq_len}; raise it)")
    loss = loss_sum / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,  # exp overflows a float past ~709
        "tokens": n_tokens,
        "examples": len(examples),
        "answers_truncated": sum(1 for e in encoded if e.answer_truncated),
        "answers_dropped": sum(1 for e in encoded if e.answer_dropped),
    }
