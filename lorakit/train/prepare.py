"""From the config's data section to encoded training and validation examples.

Reads the files (every bad row reported at once by `lorakit.data`), deduplicates, splits off a
seeded validation share when no validation file is given, encodes with the chat template and
answer-only labels, and counts what truncation cost: rows whose answer was cut, and rows left
with no supervised token, which are skipped (never silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.config import RunConfig
from lorakit.data.formats import Example, load_examples
from lorakit.data.render import Encoded, encode_example
from lorakit.data.split import dedupe, train_val_split

MIN_EXAMPLES = 500  # the material's floor: fewer than this tends to memorise


@dataclass
class PreparedData:
    train: list[Encoded]
    validation: list[Encoded]
    train_examples: list[Example]
    validation_examples: list[Example]
    duplicates_removed: int = 0
    answers_truncated: int = 0
    rows_dropped: int = 0
    warnings: list[str] = field(default_factory=list)


def _encode(examples: list[Example], tokenizer, cfg: RunConfig, counts: dict) -> tuple[list[Encoded], list[Example]]:
    kept, kept_ex = [], []
    for ex in examples:
        enc = encode_example(ex, tokenizer, cfg.data.max_seq_len, cfg.data.train_on_inputs)
        if enc.answer_dropped:
            counts["dropped"] += 1
            continue
        counts["truncated"] += int(enc.answer_truncated)
        kept.append(enc)
        kept_ex.append(ex)
    return kept, kept_ex


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    d = cfg.data
    examples = load_examples(d.train, system_prompt=d.system_prompt)
    removed = 0
    if d.dedupe:
        examples, removed = dedupe(examples)
    if d.validation:
        val_examples = load_examples(d.validation, system_prompt=d.system_prompt)
    elif d.val_fraction > 0:
        examples, val_examples = train_val_split(examples, d.val_fraction, d.seed)
    else:
        val_examples = []
    counts = {"dropped": 0, "truncated": 0}
    train, train_ex = _encode(examples, tokenizer, cfg, counts)
    val_counts = {"dropped": 0, "truncated": 0}
    validation, val_ex = _encode(val_examples, tokenizer, cfg, val_counts)
    warnings = []
    if len(train) < MIN_EXAMPLES:
        warnings.append(f"only {len(train)} training examples: below ~{MIN_EXAMPLES} a LoRA tends to "
                        "memorise rather than learn the task")
    if counts["dropped"] or counts["truncated"]:
        warnings.append(f"max_seq_len={d.max_seq_len}: {counts['truncated']} answers truncated, "
                        f"{counts['dropped']} rows skipped with no answer token left "
                        "(raise data.max_seq_len to keep them)")
    if not train:
        from lorakit.errors import DataError

        raise DataError(f"{d.train}: no usable training rows after truncation to max_seq_len={d.max_seq_len}")
    return PreparedData(train, validation, train_ex, val_ex, removed, counts["truncated"],
                        counts["dropped"], warnings)
