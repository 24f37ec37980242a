"""Constrained decoding for the server: JSON schemas and grammars as per-row token masks.

A constrained row's next token is drawn only from the tokens its grammar allows at that point,
so its answer always parses (and validates) once the grammar is complete. The masks come from
llguidance (Microsoft's Low-level Guidance, the Rust engine behind `guidance`, also a structured
output backend of vLLM and llama.cpp): it compiles a JSON schema or a Lark grammar (with `%json`
rules for embedded schemas) against the tokenizer's byte-level vocabulary and computes each
step's allowed-token bitmask on the CPU in well under a millisecond, with no warm-up compile.
Why llguidance over xgrammar is written in docs/agent.md (one small wheel with no dependencies;
xgrammar pulls triton and a TVM runtime).

Each row keeps its own matcher (`Constraint`), so constrained and free rows of different
adapters share one forward pass: the engine masks the constrained rows' logits before sampling
(`mask_logits`), feeds each drawn token back (`Constraint.accept`), and ends a row whose grammar
cannot go on (`Constraint.finished`). JSON is generated compact (no optional whitespace), as
vLLM's llguidance backend does by default, so a small model cannot spin on blank space.
"""

from __future__ import annotations

import collections
import json
import threading

import torch

COMPACT = {"whitespace_flexible": False}  # llguidance's JSON compile options: no optional spaces
CACHED = 256  # grammars whose check is remembered


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message says why."""


class GrammarCompiler:
    """Compiles schemas and grammars for one served tokenizer. The llguidance tokenizer (its
    vocabulary as byte strings; about 0.3 s for a 49k vocabulary) is built on first use."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids)
        self._ll = None
        self._lock = threading.Lock()
        self._verdicts: collections.OrderedDict[str, str] = collections.OrderedDict()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=max(len(self.tokenizer), 1),
                    eos_token=self.eos_ids or None)
            return self._ll

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, as the grammar sees them (logprobs' `bytes`)."""
        return self.ll_tokenizer.decode_bytes([token])

    def json_schema(self, schema: dict) -> str:
        """The grammar of compact JSON valid under `schema`; `GrammarError` if it cannot compile."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)
        except (ValueError, TypeError, RecursionError) as e:
            raise GrammarError(str(e)[:300] or type(e).__name__) from None
        return self._checked(grammar)

    def lark(self, text: str) -> str:
        """A Lark grammar (llguidance's dialect, `%json {...}` rules allowed), checked."""
        from llguidance import LLMatcher

        return self._checked(LLMatcher.grammar_from_lark(text))

    def _checked(self, grammar: str) -> str:
        """`grammar` once llguidance has checked it against the tokenizer (an agent sends the
        same tools every step: the verdicts of the last `CACHED` grammars are kept)."""
        from llguidance import LLMatcher

        with self._lock:
            error = self._verdicts.get(grammar)
            if error is not None:
                self._verdicts.move_to_end(grammar)
        if error is None:
            try:
                error = LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
            except Exception as e:  # a grammar the Rust side refuses outright
                error = f"{type(e).__name__}: {e}"
            with self._lock:
                self._verdicts[grammar] = error
                while len(self._verdicts) > CACHED:
                    self._verdicts.popitem(last=False)
        if error:
            raise GrammarError(error.splitlines()[0][:300])
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self, grammar)


class Constraint:
    """One row's grammar state: which tokens may come next, and whether the grammar is done."""

    def __init__(self, compiler: GrammarCompiler, grammar: str):
        from llguidance import LLMatcher

        self.compiler = compiler
        self.matcher = LLMatcher(compiler.ll_tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    @property
    def finished(self) -> bool:
        """No token but the end of turn can follow (the grammar is complete)."""
        return self.matcher.is_stopped()

    def accept(self, token: int) -> str | None:
        """Advance by the drawn token; the error when the grammar refuses it, else None."""
        if self.matcher.consume_token(token):
            return None
        return self.matcher.get_error() or f"token {token} is not allowed by the grammar"

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """Write this step's allowed tokens into one int32 row of 32-token words."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(),
                                             bitmask_row.numel() * bitmask_row.element_size())


def allowed_tokens(constraints: list[Constraint], vocab_size: int) -> torch.Tensor:
    """(k, vocab_size) bool: the tokens each constraint allows next. Tokens past the grammar's
    vocabulary (padding columns of the logits) are never allowed."""
    import numpy as np

    n_vocab = constraints[0].compiler.ll_tokenizer.vocab_size
    words = (n_vocab + 31) // 32
    bitmask = torch.zeros(len(constraints), words, dtype=torch.int32)
    for row, c in enumerate(constraints):
        c.fill(bitmask[row])
    # Token 32 w + i is bit i of word w: little-endian words, so the bytes' bits in little order.
    # numpy's unpackbits takes microseconds where the same shifts as torch ops took 10-30 ms
    # on a busy 2-core CPU (one small parallel region per op).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    out = np.zeros((len(constraints), vocab_size), dtype=bool)
    n = min(vocab_size, n_vocab)
    out[:, :n] = bits[:, :n]
    return torch.from_numpy(out)


def mask_logits(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """logits (B, V) with every token a row's constraint forbids set to -inf (rows without a
    constraint untouched; a new tensor when any row is constrained)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    allowed = allowed_tokens([constraints[i] for i in rows], logits.shape[-1]).to(logits.device)
    logits = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def mask_logits_reference(logits: torch.Tensor, constraints: list[Constraint | None]) -> torch.Tensor:
    """The plain loop `mask_logits` batches: one row at a time, token by token."""
    out = logits.clone()
    for row, c in enumerate(constraints):
        if c is None:
            continue
        allowed = allowed_tokens([c], logits.shape[-1])[0]
        for tok in range(logits.shape[-1]):
            if not allowed[tok]:
                out[row, tok] = float("-inf")
    return out
