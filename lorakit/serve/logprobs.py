"""Log-probabilities in OpenAI's two shapes, from what the engine records per generated token.

The engine keeps, for each token of a request with `logprobs`, (token id, its log-probability,
[(id, logprob)] of the k most likely tokens), computed from the model's raw logits
(lorakit/serve/sampling.py). Chat answers carry `{"content": [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}`; completions the legacy `{tokens, token_logprobs,
top_logprobs: [{token: logprob}], text_offset}` (OpenAI's API reference for both).
"""

from __future__ import annotations

Entry = tuple[int, float, list[tuple[int, float]]]


def _token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[Entry], token_bytes=None) -> dict:
    """`token_bytes(id)`: a token's own bytes (a byte-level token may hold part of a UTF-8
    character, which its decoded text cannot show); default: its text's UTF-8."""
    def one(tid: int, lp: float) -> dict:
        text = _token(tokenizer, tid)
        raw = token_bytes(tid) if token_bytes is not None else text.encode("utf-8")
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**one(tid, lp), "top_logprobs": [one(t, v) for t, v in top]}
                        for tid, lp, top in entries]}


def completion_logprobs(tokenizer, entries: list[Entry], offset: int = 0) -> dict:
    tokens, offsets = [], []
    for tid, _, _ in entries:
        offsets.append(offset)
        text = _token(tokenizer, tid)
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{_token(tokenizer, t): v for t, v in top} for _, _, top in entries],
            "text_offset": offsets}
