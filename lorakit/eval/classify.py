"""Constrained greedy decoding of a class label: the answer can only be one of the label strings.

Each label is tokenized as the model would produce it after the generation prompt (the chat
template's answer continuation, up to and including the end-of-turn token) and the token
sequences are stored in a trie. Decoding starts at the root; at every step only the children of
the current node are candidates and the one with the highest logit is taken; a row stops at a
leaf, i.e. once a whole label and its end-of-turn token have been produced. This is the
"constrained generation over a prefix trie" of GENRE (De Cao et al., 2021, `prefix_allowed_tokens_fn`
in transformers' `generate`) specialised to a closed label set, so the prediction is always a
label and never a near-miss spelling.

The batched path (`predict_labels`) left-pads the prompts, passes explicit position ids so padding
does not shift positions, keeps the KV cache so each step feeds one new token per row, and skips
the forward pass entirely once every unfinished row has a single remaining continuation in the
trie. Its meaning is the plain loop in `predict_labels_reference` (one prompt at a time, full
forward every step, no cache), which the tests use as the reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit.errors import LorakitError
from lorakit.models.head import contiguous_head_input
from lorakit.models.load import cache_of, with_cache


@dataclass
class TrieNode:
    """One token position in the label trie; `label` is set on leaves (after the end token)."""

    children: dict[int, TrieNode] = field(default_factory=dict)
    label: str | None = None
    # The forced remaining tokens and the leaf they reach when the subtree below is one chain.
    tail: tuple[tuple[int, ...], TrieNode] | None = None


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    # transformers 5 returns a BatchEncoding from tokenize=True.
    out = tokenizer.apply_chat_template(messages, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_id(tokenizer, end_token_id: int | None = None) -> int:
    """The token that closes an assistant turn: `end_token_id` if given, else the tokenizer's eos."""
    if end_token_id is not None:
        return int(end_token_id)
    if tokenizer.eos_token_id is None:
        raise LorakitError("constrained decoding: the tokenizer has no eos token; pass end_token_id "
                           "(the id of the end-of-turn token, e.g. <|im_end|> for ChatML)")
    return int(tokenizer.eos_token_id)


def label_token_ids(tokenizer, labels: list[str], end_token_id: int | None = None) -> list[list[int]]:
    """Each label's tokens as the answer after the generation prompt, ending with the end token.

    The continuation is read off the chat template: a probe conversation rendered with the label as
    the assistant answer, minus the same conversation rendered with `add_generation_prompt=True`.
    This is how the answer was tokenized for training, including any merge of the first answer
    token with what precedes it. When the template does not render the prompt as a prefix of the
    answered conversation (templates that rewrite past turns), the label is tokenized on its own.
    """
    end = end_of_turn_id(tokenizer, end_token_id)
    probe = [{"role": "user", "content": "?"}]
    prompt = _chat_ids(tokenizer, probe, add_generation_prompt=True)
    sequences = []
    for label in labels:
        full = _chat_ids(tokenizer, probe + [{"role": "assistant", "content": label}], False)
        if full[:len(prompt)] == prompt and end in full[len(prompt):]:
            rest = full[len(prompt):]
            answer = rest[:rest.index(end)]
        else:
            answer = tokenizer.encode(label, add_special_tokens=False)
        sequences.append(answer + [end])
    return sequences


def build_trie(tokenizer, labels: list[str], end_token_id: int | None = None) -> TrieNode:
    """The prefix trie of the labels' token sequences (each ends with the end-of-turn token)."""
    if not labels:
        raise LorakitError("constrained decoding: the label list is empty (expected at least one label)")
    root = TrieNode()
    for label, seq in zip(labels, label_token_ids(tokenizer, labels, end_token_id)):
        node = root
        for tok in seq:
            node = node.children.setdefault(tok, TrieNode())
        if node.label is not None:
            raise LorakitError(f"constrained decoding: labels {node.label!r} and {label!r} tokenize to "
                               f"the same tokens {seq} (expected distinct labels)")
        if node.children:
            raise LorakitError(f"constrained decoding: label {label!r} ends inside another label's "
                               "tokens (its text contains the end-of-turn token)")
        node.label = label
    _set_tails(root)
    return root


def _set_tails(node: TrieNode) -> None:
    for child in node.children.values():
        _set_tails(child)
    if node.label is not None:
        node.tail = ((), node)
    elif len(node.children) == 1:
        (tok, child), = node.children.items()
        if child.tail is not None:
            node.tail = ((tok,) + child.tail[0], child.tail[1])


def _choose(node: TrieNode, logits: torch.Tensor | None) -> int:
    """The allowed next token with the highest logit (the only one when the trie does not branch)."""
    allowed = list(node.children)
    if len(allowed) == 1:
        return allowed[0]
    scores = logits[torch.tensor(allowed, device=logits.device)]
    return allowed[int(torch.argmax(scores))]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """A batch of token lists left-padded to one width: (input_ids, attention_mask, positions),
    each (B, T) on `device`. Positions count real tokens only, so the padding shifts none (as
    transformers' `generate` does for left-padded rows)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def predict_labels_reference(model, tokenizer, prompts: list[list[int]], labels: list[str],
                             end_token_id: int | None = None) -> list[str]:
    """The plain loop `predict_labels` must equal: one prompt, a full forward at every step."""
    root = build_trie(tokenizer, labels, end_token_id)
    device = _device(model)
    predictions = []
    for prompt in prompts:
        ids, node = list(prompt), root
        while node.label is None:
            logits = None
            if len(node.children) > 1:
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            tok = _choose(node, logits)
            ids.append(tok)
            node = node.children[tok]
        predictions.append(node.label)
    return predictions


def _forward(model, keep_last: bool, **kwargs):
    if keep_last:
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
    return model(use_cache=True, **kwargs)


def _decode_batch(model, root: TrieNode, prompts: list[list[int]], pad_id: int) -> list[str]:
    """Constrained greedy decoding of one left-padded batch with the KV cache."""
    device = _device(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    input_ids, mask, positions = left_padded(prompts, pad_id, device)  # (B, T) each
    out = _forward(model, keep_last, input_ids=input_ids, attention_mask=mask, position_ids=positions)
    cache, logits = cache_of(out), out.logits[:, -1].float()  # (B, V)
    next_pos = positions[:, -1] + 1  # (B,)

    nodes = [root] * len(prompts)
    while True:
        step = torch.full((len(prompts),), pad_id, dtype=torch.long)
        live = torch.zeros(len(prompts), dtype=torch.long)
        for i, node in enumerate(nodes):
            if node.label is None:
                tok = _choose(node, logits[i])
                nodes[i] = node.children[tok]
                step[i], live[i] = tok, 1
        pending = [n for n in nodes if n.label is None]
        if not pending:
            break
        if all(n.tail is not None for n in pending):
            # Every unfinished row has one possible ending left: no logits can change the result.
            nodes = [n.tail[1] if n.label is None else n for n in nodes]
            break
        # Finished rows feed a masked pad so the batch keeps its shape and their outputs are ignored.
        mask = torch.cat([mask, live.to(device)[:, None]], dim=1)  # (B, T+1)
        out = _forward(model, keep_last, **with_cache(model, cache, dict(
            input_ids=step.to(device)[:, None], attention_mask=mask, position_ids=next_pos[:, None])))
        cache, logits = cache_of(out), out.logits[:, -1].float()
        next_pos = next_pos + 1
    return [n.label for n in nodes]


@torch.no_grad()
def predict_labels(model, tokenizer, prompts: list[list[int]], labels: list[str], batch_size: int = 16,
                   end_token_id: int | None = None,
                   on_rows: Callable[[int], None] | None = None) -> list[str]:
    """The label each prompt's greedy answer is constrained to, in prompt order.

    `prompts` are token ids ending with the generation prompt (`lorakit.data.render.encode_prompt`).
    `end_token_id` is the end-of-turn token (default: the tokenizer's eos). Prompts are batched by
    length to keep padding small; `on_rows(n)` is called after each batch with its row count
    (progress bars). The result equals `predict_labels_reference` row for row.
    """
    if batch_size < 1:
        raise LorakitError(f"predict_labels: batch_size is {batch_size} (expected >= 1)")
    for i, p in enumerate(prompts):
        if not p:
            raise LorakitError(f"predict_labels: prompt {i} is empty (expected the rendered conversation)")
    root = build_trie(tokenizer, labels, end_token_id)
    if root.tail is not None:  # a single label: nothing to decide
        return [root.tail[1].label] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer, end_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    predictions: list[str | None] = [None] * len(prompts)
    contiguous_head_input(model)  # the last-position logits of each prefill (lorakit/models/head.py)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, label in zip(idx, _decode_batch(model, root, [prompts[i] for i in idx], pad_id)):
                predictions[i] = label
            if on_rows is not None:
                on_rows(len(idx))
    finally:
        model.train(was_training)
    return predictions
