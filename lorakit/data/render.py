"""Render a conversation with the tokenizer's chat template and label only the answer tokens.

The conversation is rendered once as text; each assistant turn's character span is found by
rendering the conversation up to that turn with the generation prompt (the text before the
answer) and up to the end of that turn (the text through the answer). The span runs from the end
of the first to the end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, the eos token ...) inclusive,
so the model learns to stop; a template's newline after the marker is not learned. Tokens are then
labelled by their character offsets, which holds for any fast tokenizer. This is the "assistant
tokens mask" of transformers' `apply_chat_template(return_assistant_tokens_mask=True)`, without
needing `{% generation %}` markers in the template.

Templates that rewrite earlier turns (some drop reasoning from past assistant turns) are not
prefix-stable; for those only the final answer is supervised. A tokenizer without a chat template
falls back to an Alpaca-style text rendering with the eos token after each answer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from lorakit.data.formats import Example
from lorakit.errors import DataError

IGNORE = -100
# After every family's end-of-turn token (lorakit.models.families, imported where used, so that
# reading data files does not load torch with the models package), the plain end-of-text tokens.
_END_OF_TEXT = ("<|endoftext|>", "</s>")
_FALLBACK_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    answer_truncated: bool = False  # max_seq_len cut into a supervised span
    answer_dropped: bool = False  # no supervised token is left


def supervised_count(labels: list[int]) -> int:
    """Tokens whose next-token prediction is trained: a label set at the next position."""
    return sum(label != IGNORE for label in labels[1:])


def _render(messages, tokenizer, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            # Templates call raise_exception() on conversations they do not support
            # (roles that do not alternate, a system turn in the middle ...).
            raise DataError(f"the chat template refuses this conversation ({e})") from None
    eos = tokenizer.eos_token or ""
    parts = []
    for m in messages:
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"{_FALLBACK_HEADERS[m['role']]}{m['content']}{end}\n\n")
    if add_generation_prompt:
        parts.append(_FALLBACK_HEADERS["assistant"])
    return "".join(parts)


_MARKERS_BY_TOKENIZER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _end_markers(tokenizer) -> list[str]:
    """End-of-turn strings this tokenizer knows; computed once per tokenizer (get_vocab is slow)."""
    markers = _MARKERS_BY_TOKENIZER.get(tokenizer)
    if markers is None:
        from lorakit.models.families import end_of_turn_tokens

        vocab = tokenizer.get_vocab()
        markers = [m for m in dict.fromkeys(end_of_turn_tokens() + _END_OF_TEXT) if m in vocab]
        if tokenizer.eos_token and tokenizer.eos_token not in markers:
            markers.append(tokenizer.eos_token)
        _MARKERS_BY_TOKENIZER[tokenizer] = markers
    return markers


def _answer_end(turn_text: str, start: int, markers: list[str]) -> int:
    """End (exclusive) of the answer in a turn: through the first end-of-turn marker after it."""
    found = [(turn_text.find(m, start), m) for m in markers]
    found = [(i, m) for i, m in found if i >= 0]
    if found:
        i, m = min(found)
        return i + len(m)
    return len(turn_text.rstrip())


def answer_spans(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(full rendered text, character spans of the supervised assistant answers)."""
    full = _render(messages, tokenizer, add_generation_prompt=False)
    markers = _end_markers(tokenizer)
    spans = []
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistant_turns:
        before = _render(messages[:i], tokenizer, add_generation_prompt=True)
        through = _render(messages[:i + 1], tokenizer, add_generation_prompt=False)
        # Stable through the end-of-turn marker is enough: Phi-3's template closes a
        # conversation with eos, which the full render has only after its last turn.
        end = _answer_end(through, len(before), markers)
        if not (through.startswith(before) and full.startswith(through[:end])):
            spans = []  # not prefix-stable: supervise the final answer alone (below)
            break
        spans.append((len(before), end))
    if not spans:
        before = _render(messages[:-1], tokenizer, add_generation_prompt=True)
        if not full.startswith(before):
            raise DataError("the chat template renders the prompt differently with and without the "
                            "answer; cannot tell which tokens are the answer")
        spans = [(len(before), _answer_end(full, len(before), markers))]
    return full, spans


def encode_example(ex: Example, tokenizer, max_seq_len: int, train_on_inputs: bool = False) -> Encoded:
    """Token ids and labels for one example, truncated to `max_seq_len` from the end."""
    try:
        full, spans = answer_spans(ex.messages, tokenizer)
    except DataError as e:
        raise DataError(f"{ex.source}:{ex.line}: {e}") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [t if any(s <= start < e for s, e in spans) else IGNORE
                  for t, (start, _) in zip(ids, offsets)]
    supervised = supervised_count(labels)
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    kept = supervised_count(labels)
    return Encoded(ids, labels, answer_truncated=kept < supervised, answer_dropped=kept == 0)


def encode_prompt(messages, tokenizer) -> list[int]:
    """The conversation without its answer, ending with the generation prompt, as token ids."""
    text = _render(list(messages), tokenizer, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
