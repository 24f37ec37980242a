"""Choosing the next token and deciding when a sequence ends.

Sampling follows transformers' logits warpers (`TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, applied in that order) with temperature 0 meaning greedy argmax, as in the
OpenAI API and vLLM. Tiny temperatures follow vLLM's `SamplingParams` (`_SAMPLING_EPS`,
`_MAX_TEMP`): below 1e-5 the row is greedy, below 1e-2 it samples at 1e-2, since dividing logits
by less overflows to inf and the softmax to NaN. Each request owns a `torch.Generator` seeded
from its `seed`, so a seeded request draws the same tokens whatever else shares its batch.

Rows are independent: a row whose logits are not finite (NaN or +inf, e.g. from an adapter whose
weights overflow) or whose draw fails gets a `SamplingError` instead of a token, and the engine
fails that request alone.

Before sampling, a row's logits may be adjusted as OpenAI's API defines: `logit_bias` adds a
bias to named token ids, and `presence_penalty` / `frequency_penalty` subtract
`frequency_penalty * count[j] + presence_penalty * (count[j] > 0)` from token j's logit, counting
the tokens the row has generated so far (OpenAI's text generation guide; vLLM counts output
tokens the same way). `logprobs` are the model's own log-probabilities (log-softmax of the raw
logits, before bias, penalties, constraints or temperature), as vLLM's default `raw_logprobs`.

Stop strings follow vLLM's detokenizer rules: the text is decoded from all generated ids each
step (so multi-byte characters split across tokens come out whole), a stop string ends the
sequence and is not returned, and streamed text holds back any tail that could still become a
stop string or an incomplete character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below this is greedy
MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: a smaller positive temperature samples at this one


class SamplingError(Exception):
    """One row's next token could not be chosen (non-finite logits, a failed draw)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None = off; k = the chosen token's and the k most likely ones

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's logits (V,) after temperature, top-k and top-p (removed entries = -inf)."""
    logits = logits.float() / max(params.temperature, MIN_TEMPERATURE)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is <= 1 - top_p; the most likely token always stays.
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[-1] = False
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def adjust_logits(logits: torch.Tensor, params: list[SamplingParams],
                  outputs: list[list[int]]) -> torch.Tensor:
    """logits (B, V) after each row's `logit_bias` and presence / frequency penalties (a new
    tensor when any row has one; the input otherwise)."""
    rows = [i for i, p in enumerate(params)
            if p.logit_bias or p.presence_penalty or p.frequency_penalty]
    if not rows:
        return logits
    logits = logits.float().clone()  # (B, V)
    vocab = logits.shape[-1]
    for i in rows:
        p = params[i]
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            if ids:
                logits[i, ids] += torch.tensor([p.logit_bias[t] for t in ids], device=logits.device)
        if (p.presence_penalty or p.frequency_penalty) and outputs[i]:
            counts = torch.bincount(torch.tensor(outputs[i], device=logits.device),
                                    minlength=vocab)[:vocab].float()  # (V,)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def adjust_logits_reference(logits: torch.Tensor, params: list[SamplingParams],
                            outputs: list[list[int]]) -> torch.Tensor:
    """The plain loop `adjust_logits` batches, token by token as OpenAI's guide writes it."""
    out = logits.float().clone()
    for i, (p, generated) in enumerate(zip(params, outputs)):
        for tok in range(out.shape[-1]):
            count = generated.count(tok)
            out[i, tok] += p.logit_bias.get(tok, 0.0)
            out[i, tok] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def top_logprobs(logprobs: torch.Tensor, chosen: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """From one row's log-probabilities (V,): the chosen token's and the k most likely
    (id, logprob), most likely first."""
    top = torch.topk(logprobs, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[chosen]), pairs


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> list[int | SamplingError]:
    """The next token of every row: logits (B, V) -> B ids, or a `SamplingError` for a row that
    cannot have one (its request fails; the other rows go on). Greedy rows share one argmax."""
    # One argmax for all rows, only when some row is greedy (a (32, 49,152) argmax is ms); in fp32,
    # as bf16's argmax is slower here than the cast and fp32's.
    greedy = logits.float().argmax(-1).tolist() if any(p.greedy for p in params) else None
    # NaN or +inf anywhere in a row (or no finite entry) makes its argmax and softmax meaningless;
    # a row's max is NaN when any entry is, so one reduction finds them.
    broken = (~torch.isfinite(logits.amax(-1))).tolist()
    out: list[int | SamplingError] = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if broken[row]:
            out.append(SamplingError("the model's output (logits) for this request is not finite "
                                     "(NaN or inf)"))
        elif p.greedy:
            out.append(greedy[row])
        else:
            try:
                probs = warp(logits[row], p).softmax(-1)
                out.append(int(torch.multinomial(probs, 1, generator=gen)))
            except (RuntimeError, ValueError, ZeroDivisionError, OverflowError) as e:
                out.append(SamplingError(f"sampling failed ({e})"))
    return out


def find_stop(text: str, stops: list[str], start: int) -> int:
    """Index where the earliest stop string begins at or after `start` - (longest stop - 1)
    (a stop may straddle the previous check), or -1."""
    best = -1
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of `text` may be streamed now: all but a tail that could begin a stop string,
    and never a trailing replacement character from a half-decoded multi-byte character."""
    n = len(text)
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n -= hold
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    return n
