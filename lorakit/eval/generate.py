"""Batched greedy generation of free-text answers, for generation tasks and the forgetting probe.

`greedy_answers` left-pads a batch of prompts (token ids ending with the generation prompt),
passes explicit position ids so the padding shifts no real token, keeps the KV cache so each step
feeds one new token per row, and stops a row at its end-of-turn token (or the tokenizer's eos) or
after `max_new_tokens`. Prompts are batched by length so little compute goes to padding, and
answers come back in prompt order. Its meaning is the plain loop `greedy_answers_reference`: one
prompt at a time, a full forward at every step, no cache (the tests hold the two equal), the way
`lorakit.eval.classify` pairs its constrained decoder with a reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from lorakit.errors import LorakitError
from lorakit.eval.classify import _device, end_of_turn_id, left_padded
from lorakit.models.head import contiguous_head_input
from lorakit.models.load import cache_of, with_cache


def _stop_ids(tokenizer, end_token_id: int | None) -> set[int]:
    stop = {end_of_turn_id(tokenizer, end_token_id)}
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    return stop


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def greedy_answers_reference(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
                             end_token_id: int | None = None) -> list[str]:
    """The plain loop `greedy_answers` must equal: one prompt, a full forward at every step."""
    stop, device = _stop_ids(tokenizer, end_token_id), _device(model)
    answers = []
    for prompt in prompts:
        ids, new = list(prompt), []
        for _ in range(max_new_tokens):
            tok = int(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().argmax())
            if tok in stop:
                break
            ids.append(tok)
            new.append(tok)
        answers.append(_decode(tokenizer, new))
    return answers


def _generate_batch(model, prompts: list[list[int]], pad_id: int, stop: set[int],
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of one left-padded batch, each row cut at its first stop token."""
    device = _device(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if keep_last else {}
    input_ids, mask, positions = left_padded(prompts, pad_id, device)  # (B, T) each
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache, logits = cache_of(out), out.logits[:, -1].float()  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1).tolist()  # (B,)
        for i, tok in enumerate(chosen):
            if not done[i]:
                if tok in stop:
                    done[i] = True
                else:
                    new[i].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows feed a masked pad so the batch keeps its shape; their outputs are ignored.
        feed = torch.tensor([pad_id if d else t for d, t in zip(done, chosen)], device=device)
        live = torch.tensor([0 if d else 1 for d in done], dtype=torch.long, device=device)
        mask = torch.cat([mask, live[:, None]], dim=1)  # (B, T+1)
        out = model(**with_cache(model, cache, dict(input_ids=feed[:, None], attention_mask=mask,
                                                    position_ids=next_pos[:, None], use_cache=True,
                                                    **extra)))
        cache, logits = cache_of(out), out.logits[:, -1].float()
        next_pos = next_pos + 1
    return new


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
                   batch_size: int = 16, end_token_id: int | None = None,
                   on_rows: Callable[[int], None] | None = None) -> list[str]:
    """The greedy answer to each prompt (decoded, special tokens dropped, stripped), in order.

    `prompts` are token ids ending with the generation prompt (`lorakit.data.render.encode_prompt`);
    `end_token_id` is the end-of-turn token (default: the tokenizer's eos). `on_rows(n)` is
    called after each batch (progress bars).
    """
    if batch_size < 1:
        raise LorakitError(f"greedy_answers: batch_size is {batch_size} (expected >= 1)")
    if max_new_tokens < 1:
        raise LorakitError(f"greedy_answers: max_new_tokens is {max_new_tokens} (expected >= 1)")
    for i, p in enumerate(prompts):
        if not p:
            raise LorakitError(f"greedy_answers: prompt {i} is empty (expected the rendered conversation)")
    stop = _stop_ids(tokenizer, end_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    contiguous_head_input(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, ids in zip(idx, _generate_batch(model, [prompts[i] for i in idx], pad_id, stop,
                                                   max_new_tokens)):
                answers[i] = _decode(tokenizer, ids)
            if on_rows is not None:
                on_rows(len(idx))
    finally:
        model.train(was_training)
    return answers
