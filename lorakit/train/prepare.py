"""From the config's data section to encoded training and validation examples.

Reads the files (every bad row reported at once by `lorakit.data`), deduplicates, splits off a
seeded validation share when no validation file is given, encodes with the chat template and
answer-only labels, and counts what truncation cost: rows whose answer was cut, and rows left
with no supervised token, which are skipped (never silently). Duplicates dropped are counted and
reported; validation that was asked for and came out empty is an error, and the eval section's
file is read here too, so a bad eval file stops the run before training, not after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.config import RunConfig
from lorakit.data.formats import Example, load_examples
from lorakit.data.render import Encoded, encode_example
from lorakit.data.split import dedupe, train_val_split
from lorakit.errors import ConfigError, DataError

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


def encode_rows(examples: list[Example], tokenizer, cfg: RunConfig) -> list[Encoded]:
    """Rows encoded as training rows are (mixed-in data: rows with no answer left are skipped)."""
    return _encode(examples, tokenizer, cfg, {"dropped": 0, "truncated": 0})[0]


def check_model_fits(cfg: RunConfig, model) -> None:
    """Refuse a `data.max_seq_len` beyond the positions the model was built for."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.data.max_seq_len > positions:
        raise ConfigError(f"data.max_seq_len: got {cfg.data.max_seq_len} but {cfg.model.name} has "
                          f"{positions} positions (max_position_embeddings; expected <= {positions})")


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    d = cfg.data
    examples = load_examples(d.train, system_prompt=d.system_prompt)
    if cfg.eval.data:  # read now: a bad eval file should stop the run before training
        load_examples(cfg.eval.data, system_prompt=d.system_prompt)
    removed = 0
    if d.dedupe:
        examples, removed = dedupe(examples)
    if d.validation:
        val_examples = load_examples(d.validation, system_prompt=d.system_prompt)
    elif d.val_fraction > 0:
        n = len(examples)
        examples, val_examples = train_val_split(examples, d.val_fraction, d.seed)
        if not val_examples or not examples:
            raise DataError(f"{d.train}: data.val_fraction={d.val_fraction} of {n} rows leaves "
                            f"{len(examples)} training and {len(val_examples)} validation rows "
                            "(expected at least one of each: add rows or set data.validation)")
    else:
        val_examples = []
    counts = {"dropped": 0, "truncated": 0}
    train, train_ex = _encode(examples, tokenizer, cfg, counts)
    val_counts = {"dropped": 0, "truncated": 0}
    validation, val_ex = _encode(val_examples, tokenizer, cfg, val_counts)
    if val_examples and not validation:
        raise DataError(f"{d.validation or d.train}: no usable validation rows after truncation to "
                        f"max_seq_len={d.max_seq_len} (all {len(val_examples)} lost their answer; "
                        "raise data.max_seq_len)")
    warnings = []
    if removed:
        warnings.append(f"dropped {removed} duplicate rows (data.dedupe: true; same conversation "
                        "after case and whitespace folding)")
    if len(train) < MIN_EXAMPLES:
        warnings.append(f"only {len(train)} training examples: below ~{MIN_EXAMPLES} a LoRA tends to "
                        "memorise rather than learn the task")
    if counts["dropped"] or counts["truncated"]:
        warnings.append(f"max_seq_len={d.max_seq_len}: {counts['truncated']} answers truncated, "
                        f"{counts['dropped']} rows skipped with no answer token left "
                        "(raise data.max_seq_len to keep them)")
    if not train:
        raise DataError(f"{d.train}: no usable training rows after truncation to max_seq_len={d.max_seq_len}")
    return PreparedData(train, validation, train_ex, val_ex, removed, counts["truncated"],
                        counts["dropped"], warnings)
