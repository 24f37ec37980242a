"""`lorakit data stats FILE`: what a data file holds before anyone trains on it.

Counts by shape, duplicates, token-length percentiles (prompt, answer, total) with the model's
tokenizer and chat template, rows whose answer `max_seq_len` would cut or drop, label counts when
the answers look categorical, and warnings, among them the material's floor: below about 500
examples a LoRA tends to memorise.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lorakit.data.formats import load_examples
from lorakit.data.render import IGNORE, encode_example
from lorakit.data.split import dedupe

MIN_EXAMPLES = 500
MAX_LABELS = 50


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(values)

    def pick(q):
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": s[-1]}


def _shape_of(ex) -> str:
    roles = [m["role"] for m in ex.messages]
    return "multi-turn chat" if roles.count("assistant") > 1 else "single-turn"


def mix_stats(n_task: int, mix: list[dict], replay: float) -> dict:
    """What each epoch holds when `n_task` task rows train with `data.mix` and `data.replay`
    (lorakit/data/mix.py): rows per source per epoch, their share, and the pool each is drawn from."""
    from lorakit.data.mix import epoch_counts, mix_problems
    from lorakit.errors import ConfigError
    from lorakit.eval.forgetting import replay_prompts

    problems = mix_problems(mix, replay)
    if problems:
        raise ConfigError("; ".join(problems))
    sources = [(e["path"], float(e["weight"]), len(load_examples(e["path"]))) for e in mix]
    if replay:
        sources.append(("replay rows (the base's answers to the general prompts)", replay,
                        len(replay_prompts())))
    counts = epoch_counts(n_task, [w for _, w, _ in sources])
    return {"task_rows": n_task, "rows_per_epoch": n_task + sum(counts),
            "sources": [{"source": name, "share": w, "rows_per_epoch": c, "pool": pool}
                        for (name, w, pool), c in zip(sources, counts)]}


def data_stats(path: str | Path, tokenizer, max_seq_len: int = 2048, examples=None,
               mix: list[dict] = (), replay: float = 0.0) -> dict:
    """The stats of a data file (`examples`: its rows, when already read with `load_examples`);
    with `mix`/`replay` (the data section's fields), the rows of each epoch by source."""
    examples = load_examples(path) if examples is None else examples
    _, duplicates = dedupe(examples)
    totals, prompts, answers = [], [], []
    truncated = dropped = 0
    for ex in examples:
        full = encode_example(ex, tokenizer, max_seq_len=10 ** 9)
        n_answer = sum(label != IGNORE for label in full.labels)
        totals.append(len(full.input_ids))
        answers.append(n_answer)
        prompts.append(len(full.input_ids) - n_answer)
        cut = encode_example(ex, tokenizer, max_seq_len=max_seq_len)
        truncated += cut.answer_truncated and not cut.answer_dropped
        dropped += cut.answer_dropped
    labels = Counter(ex.label for ex in examples)
    categorical = len(labels) <= MAX_LABELS and len(labels) < len(examples)
    warnings = []
    if len(examples) < MIN_EXAMPLES:
        warnings.append(f"fewer than {MIN_EXAMPLES} examples ({len(examples)}): a LoRA trained on this "
                        "tends to memorise; 500-1,000 good examples is a floor")
    if duplicates:
        warnings.append(f"{duplicates} duplicate rows (training drops them with data.dedupe: true "
                        "and reports how many)")
    if truncated or dropped:
        warnings.append(f"at max_seq_len={max_seq_len}: {truncated} answers cut short, {dropped} rows "
                        "with no answer token left")
    if categorical:
        smallest = min(labels.values())
        if smallest * 5 < max(labels.values()):
            warnings.append(f"labels are imbalanced: smallest class has {smallest} rows, largest "
                            f"{max(labels.values())}")
    return {
        "file": str(path), "rows": len(examples), "shapes": dict(Counter(_shape_of(e) for e in examples)),
        "duplicates": duplicates, "max_seq_len": max_seq_len,
        "tokens": {"prompt": _percentiles(prompts), "answer": _percentiles(answers),
                   "total": _percentiles(totals), "sum": sum(totals)},
        "answers_truncated": truncated, "rows_dropped": dropped,
        "labels": dict(sorted(labels.items(), key=lambda kv: (-kv[1], str(kv[0])))) if categorical else None,
        "warnings": warnings,
        "mix": mix_stats(len(examples) - duplicates, list(mix), replay) if mix or replay else None,
    }


def print_data_stats(stats: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    shapes = ", ".join(f"{n} {k}" for k, n in stats["shapes"].items())
    console.print(f"[bold]{stats['file']}[/]: {stats['rows']:,} rows ({shapes}), "
                  f"{stats['duplicates']} duplicates, {stats['tokens']['sum']:,} tokens")
    table = Table(title="tokens per row")
    table.add_column("part")
    for q in ("p50", "p90", "p99", "max"):
        table.add_column(q, justify="right")
    for part in ("prompt", "answer", "total"):
        table.add_row(part, *(str(stats["tokens"][part][q]) for q in ("p50", "p90", "p99", "max")))
    console.print(table)
    if stats["labels"]:
        labels = Table(title="labels")
        labels.add_column("label")
        labels.add_column("rows", justify="right")
        for label, n in stats["labels"].items():
            labels.add_row(str(label), str(n))
        console.print(labels)
    if stats.get("mix"):
        m = stats["mix"]
        mixed = Table(title=f"each epoch: {m['rows_per_epoch']:,} rows (task rows after dedupe, then mixed in)")
        for col in ("source", "rows", "share", "drawn from"):
            mixed.add_column(col, justify="left" if col == "source" else "right")
        mixed.add_row(str(stats["file"]), f"{m['task_rows']:,}", f"{100 * m['task_rows'] / m['rows_per_epoch']:.1f}%",
                      f"{m['task_rows']:,}")
        for src in m["sources"]:
            mixed.add_row(src["source"], f"{src['rows_per_epoch']:,}",
                          f"{100 * src['rows_per_epoch'] / m['rows_per_epoch']:.1f}%", f"{src['pool']:,}")
        console.print(mixed)
    for w in stats["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
