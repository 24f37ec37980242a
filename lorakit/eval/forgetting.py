"""How much general ability a fine-tune cost: the forgetting probe beside the task score.

Catastrophic forgetting (McCloskey and Cohen 1989; measured for LLM fine-tuning by Luo et al.
2023, "An Empirical Study of Catastrophic Forgetting in LLMs during Continual Fine-tuning") shows
as the fine-tuned model no longer saying what the base said to ordinary requests. The probe asks
the shipped general prompts (`lorakit/examples/general_prompts.jsonl`: a few hundred requests we
wrote, across knowledge, how-to, writing, arithmetic, reasoning, code, definitions, advice,
lists and rewriting) and compares the two models on the base's own greedy answers:

    drift = mean over answer tokens of -log p_adapter(answer) - mean of -log p_base(answer)
          = log(perplexity_adapter / perplexity_base)        (nats per token; 0 = no change)

and the share of prompts whose greedy answer is unchanged (the adapter's answer equals the
base's, token for token after decoding). An adapter with B = 0 has drift 0 and 100% unchanged.

Every fourth prompt is a probe prompt; the other three quarters are the replay pool that
`data.replay` trains on (lorakit/data/mix.py), so a run with replay is never measured on the
prompts it rehearsed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from lorakit.data.formats import Example
from lorakit.errors import DataError, LorakitError

GENERAL_PROMPTS = Path(__file__).resolve().parent.parent / "examples" / "general_prompts.jsonl"
PROBE_EVERY = 4  # prompt i is a probe prompt when i % PROBE_EVERY == 0, else a replay prompt
PROBE_MAX_NEW_TOKENS = 48


def general_prompts(path: str | Path | None = None) -> list[str]:
    """The prompts of a general-prompts file (JSONL with a "prompt" per row), in file order."""
    import json

    path = Path(path or GENERAL_PROMPTS)
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected a JSON object with a \"prompt\" string") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}:{n}: \"prompt\" is empty or not a string")
        prompts.append(prompt)
    return prompts


def probe_prompts(path: str | Path | None = None) -> list[str]:
    return [p for i, p in enumerate(general_prompts(path)) if i % PROBE_EVERY == 0]


def replay_prompts(path: str | Path | None = None) -> list[str]:
    return [p for i, p in enumerate(general_prompts(path)) if i % PROBE_EVERY != 0]


def prompt_ids(prompts: list[str], tokenizer, system_prompt: str | None = None) -> list[list[int]]:
    """Each prompt as a one-turn chat ending with the generation prompt (token ids)."""
    from lorakit.data.render import encode_prompt

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [encode_prompt(system + [{"role": "user", "content": p}], tokenizer) for p in prompts]


def answered(prompts: list[str], answers: list[str], source: str,
             system_prompt: str | None = None) -> list[Example]:
    """(prompt, answer) pairs as chat examples whose answer is learned or scored."""
    system = ({"role": "system", "content": system_prompt},) if system_prompt else ()
    return [Example(messages=system + ({"role": "user", "content": p}, {"role": "assistant", "content": a}),
                    line=i + 1, source=source) for i, (p, a) in enumerate(zip(prompts, answers))]


def probe(model, tokenizer, base_model=None, prompts: list[str] | None = None,
          max_new_tokens: int = PROBE_MAX_NEW_TOKENS, batch_size: int = 16, max_seq_len: int = 512,
          system_prompt: str | None = None) -> dict:
    """The forgetting probe of `model` (with LoRA layers) against its base.

    The base is `model` with its adapters switched off, or `base_model` when given (a full or
    freeze run, whose trained weights have no switch). Returns a JSON-ready dict: prompts,
    base_perplexity, adapter_perplexity, perplexity_ratio, drift, unchanged (a share) and rows
    ({prompt, base, adapter} per prompt).
    """
    from lorakit.eval.generate import greedy_answers
    from lorakit.eval.perplexity import supervised_loss
    from lorakit.lora import lora_layers, set_adapters_enabled

    if base_model is None and not any(True for _ in lora_layers(model)):
        raise LorakitError("forgetting probe: the model has no LoRA layers to switch off; pass the "
                           "untouched base (base_model) to compare against")
    prompts = probe_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise DataError("forgetting probe: no prompts")
    started = time.perf_counter()
    ids = prompt_ids(prompts, tokenizer, system_prompt)
    base = base_model if base_model is not None else model
    set_adapters_enabled(base, False)
    try:
        base_said = greedy_answers(base, tokenizer, ids, max_new_tokens, batch_size)
        rows = answered(prompts, base_said, "general prompts (base answers)", system_prompt)
        base_loss = supervised_loss(base, tokenizer, rows, max_seq_len, batch_size)["loss"]
    finally:
        set_adapters_enabled(base, True)
    adapter_loss = supervised_loss(model, tokenizer, rows, max_seq_len, batch_size)["loss"]
    adapter_said = greedy_answers(model, tokenizer, ids, max_new_tokens, batch_size)
    drift = adapter_loss - base_loss
    unchanged = sum(a == b for a, b in zip(base_said, adapter_said)) / len(prompts)
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "base_perplexity": math.exp(min(base_loss, 700)),
            "adapter_perplexity": math.exp(min(adapter_loss, 700)),
            "perplexity_ratio": math.exp(min(drift, 700)), "drift": drift, "unchanged": unchanged,
            "seconds": time.perf_counter() - started,
            "rows": [{"prompt": p, "base": b, "adapter": a}
                     for p, b, a in zip(prompts, base_said, adapter_said)]}


def summary_line(result: dict) -> str:
    """One line for the terminal and the report, beside the task score."""
    return (f"general ability (forgetting probe, {result['prompts']} general prompts): perplexity "
            f"on the base's answers x{result['perplexity_ratio']:.3f} of the base's "
            f"({result['base_perplexity']:.3f} -> {result['adapter_perplexity']:.3f}, drift "
            f"{result['drift']:+.4f} nats/token); greedy answers unchanged: "
            f"{100 * result['unchanged']:.1f}%")
