"""Prompting and retrieval baselines beside the adapter: what the adapter has to beat.

"Always run a base model baseline first", and "a good RAG prompt often outperforms a poorly
fine-tuned model": before an adapter ships, the base model should be given its best chance with
prompting alone. Each baseline is the base model with a different prompt for the same test rows:

- zero-shot: the row as it is (what `lorakit eval --compare` puts in its base column);
- few-shot:K: K labelled training rows as earlier user/assistant turns of the conversation
  (Brown et al. 2020, "Language Models are Few-Shot Learners"). The K rows are drawn once with a
  seeded `random.Random` and, for classification, balanced over the labels: the label counts
  differ by at most one, and when K is below the number of labels, K distinct labels appear;
- retrieval:K: per test row, the K training rows most similar to it by BM25 (an SQLite FTS5 index,
  `lorakit.eval.retrieval`) as the turns, most similar last, nearest the question (Liu et al.
  2022, "What Makes Good In-Context Examples for GPT-3?"). With a corpus file (knowledge tasks)
  the K best passages go into the system message as context instead: the retrieval-augmented
  generation baseline of Lewis et al. 2020.

Every column, the adapter's included, is scored the same way: the answer decoded constrained to
the label set (`classify.predict_labels`), accuracy, macro-F1 and per-class F1
(`metrics.classification_report`), the mean prompt length in tokens, and the decoding time per
row (batched; a long prompt costs at every request what a LoRA costs once, in training).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.eval.metrics import classification_report
from lorakit.eval.run import answer_of

KINDS = ("zero-shot", "few-shot", "retrieval")
BASELINES_JSON, BASELINES_MD = "baselines.json", "baselines.md"
_SPEC = re.compile(r"^(zero-shot|few-shot|retrieval)(?::(\d+))?$")


@dataclass(frozen=True)
class Baseline:
    kind: str  # one of KINDS
    k: int = 0  # examples (or passages) in the prompt; 0 for zero-shot

    @property
    def name(self) -> str:
        return self.kind if self.kind == "zero-shot" else f"{self.kind} K={self.k}"


def baseline_problems(spec: str) -> list[str]:
    """What is wrong with a baselines spec such as "zero-shot,few-shot:5,retrieval:5" (empty: ok)."""
    problems = []
    seen = set()
    for part in (p.strip() for p in spec.split(",")):
        m = _SPEC.match(part)
        if not m:
            problems.append(f"{part!r} (expected zero-shot, few-shot:K or retrieval:K, K >= 1)")
            continue
        kind, k = m.group(1), m.group(2)
        if kind == "zero-shot" and k is not None:
            problems.append(f"{part!r} (zero-shot takes no K)")
        elif kind != "zero-shot" and (k is None or int(k) < 1):
            problems.append(f"{part!r} (expected {kind}:K with K >= 1, e.g. {kind}:5)")
        elif part in seen:
            problems.append(f"{part!r} is listed twice")
        seen.add(part)
    return problems


def parse_baselines(spec: str | None) -> list[Baseline]:
    """"zero-shot,few-shot:5,retrieval:5" -> [Baseline('zero-shot'), ...]; '' or None -> []."""
    if not spec or not spec.strip():
        return []
    problems = baseline_problems(spec)
    if problems:
        raise ConfigError("baselines: " + "; ".join(problems))
    out = []
    for part in (p.strip() for p in spec.split(",")):
        kind, _, k = part.partition(":")
        out.append(Baseline(kind, int(k) if k else 0))
    return out


def _turns(ex) -> list[dict]:
    """The example's conversation without its system message (the demonstration turns)."""
    return [dict(m) for m in ex.messages if m["role"] != "system"]


def query_text(ex) -> str:
    """What a row asks: its non-system prompt messages (the answer left out)."""
    return "\n".join(m["content"] for m in ex.messages[:-1] if m["role"] != "system")


def with_demonstrations(ex, demos) -> object:
    """`ex` with each demo's user/assistant turns inserted after its system message, in order."""
    messages = list(ex.messages)
    head = [dict(messages[0])] if messages[0]["role"] == "system" else []
    turns = [t for d in demos for t in _turns(d)]
    return dataclasses.replace(ex, messages=tuple(head + turns + [dict(m) for m in messages[len(head):]]))


def with_context(ex, passages: list[str]) -> object:
    """`ex` with the passages as numbered context in its system message (added or extended)."""
    context = "Use these passages if they help:\n" + "\n".join(
        f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1))
    messages = [dict(m) for m in ex.messages]
    if messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"].rstrip() + "\n\n" + context
    else:
        messages.insert(0, {"role": "system", "content": context})
    return dataclasses.replace(ex, messages=tuple(messages))


def few_shot_demos(train, k: int, seed: int, classification: bool) -> list:
    """K training rows, seeded; for classification balanced over the labels (round robin over the
    labels in a shuffled order, each label's rows shuffled), then shuffled as a whole."""
    if k > len(train):
        raise DataError(f"few-shot:{k}: only {len(train)} training rows (expected at least K)")
    rng = random.Random(seed)
    if not classification:
        return rng.sample(list(train), k)
    by_label: dict[str, list] = defaultdict(list)
    for ex in train:
        by_label[answer_of(ex)].append(ex)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for label in labels:
        rng.shuffle(by_label[label])
    demos, depth = [], 0
    while len(demos) < k:
        for label in labels:
            if depth < len(by_label[label]) and len(demos) < k:
                demos.append(by_label[label][depth])
        depth += 1
    rng.shuffle(demos)
    return demos


def prompted_rows(baseline: Baseline, test, train, seed: int = 0, classification: bool = True,
                  index_path: str | Path | None = None, corpus: list[str] | None = None) -> list:
    """The test rows as `baseline` prompts them (see the module docstring)."""
    if baseline.kind == "zero-shot":
        return list(test)
    if baseline.kind == "few-shot":
        if not train:
            raise DataError("few-shot baseline: no training rows (expected the training data)")
        demos = few_shot_demos(train, baseline.k, seed, classification)
        return [with_demonstrations(ex, demos) for ex in test]
    from lorakit.eval.retrieval import BM25Index

    if corpus:
        with BM25Index(corpus, index_path) as index:
            return [with_context(ex, [corpus[i] for i, _ in index.search(query_text(ex), baseline.k)])
                    for ex in test]
    if not train:
        raise DataError("retrieval baseline: no training rows and no corpus (expected one of them)")
    with BM25Index([query_text(ex) for ex in train], index_path) as index:
        out = []
        for ex in test:
            hits = index.search(query_text(ex), baseline.k)
            out.append(with_demonstrations(ex, [train[i] for i, _ in reversed(hits)]))
        return out


def score_rows(model, tokenizer, rows, labels: list[str], batch_size: int = 16,
               end_token_id: int | None = None) -> dict:
    """One column of the table: constrained answers on `rows`, the classification report, the
    mean prompt tokens per row and the decoding seconds per row."""
    from lorakit.data.render import encode_prompt
    from lorakit.eval.classify import predict_labels

    y_true = [answer_of(ex) for ex in rows]
    prompts = [encode_prompt(list(ex.messages[:-1]), tokenizer) for ex in rows]
    started = time.perf_counter()
    predictions = predict_labels(model, tokenizer, prompts, labels, batch_size=batch_size,
                                 end_token_id=end_token_id)
    seconds = time.perf_counter() - started
    return {"rows": len(rows), "labels": list(labels), "y_true": y_true, "predictions": predictions,
            "report": classification_report(y_true, predictions, labels),
            "prompt_tokens_per_row": sum(map(len, prompts)) / len(rows),
            "seconds_per_row": seconds / len(rows)}


def subset(rows, n: int, seed: int) -> list:
    """A seeded subset of n rows in their original order (all rows when n is 0 or >= len)."""
    if not n or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def run_baselines(model, tokenizer, test, train, baselines: list[Baseline], labels: list[str],
                  base_model=None, adapter: bool = True, seed: int = 0, batch_size: int = 16,
                  index_dir: str | Path | None = None, corpus: list[str] | None = None,
                  max_rows: int = 0, console=None) -> dict:
    """Every baseline on the base model, and the adapter, on the same (seeded subset of) rows.

    `model` carries the adapter; the base is `base_model` when given (full or freeze runs), else
    `model` with its LoRA layers switched off. Returns {"rows", "seed", "labels", "columns": [{name,
    ...score_rows}]}, the adapter's column last.
    """
    from lorakit.lora import set_adapters_enabled

    if not baselines and not adapter:
        raise LorakitError("run_baselines: nothing to score (no baselines and no adapter)")
    test = subset(test, max_rows, seed)
    unknown = sorted({answer_of(ex) for ex in test} - set(labels))
    if unknown:
        raise DataError(f"baselines: test answers {unknown} are not in the label set {labels}")
    base = base_model if base_model is not None else model
    index_path = Path(index_dir) / "retrieval.sqlite" if index_dir is not None else None
    columns = []
    for b in baselines:
        rows = prompted_rows(b, test, train, seed=seed, index_path=index_path, corpus=corpus)
        if console:
            console.print(f"[bold]baseline {b.name}[/] on {len(rows)} rows")
        set_adapters_enabled(base, False)
        try:
            col = score_rows(base, tokenizer, rows, labels, batch_size=batch_size)
        finally:
            set_adapters_enabled(base, True)
        columns.append({"name": b.name, "kind": b.kind, "k": b.k, **col})
    if adapter:
        if console:
            console.print(f"[bold]adapter[/] on {len(test)} rows")
        columns.append({"name": "adapter", "kind": "adapter", "k": 0,
                        **score_rows(model, tokenizer, test, labels, batch_size=batch_size)})
    return {"rows": len(test), "seed": seed, "labels": list(labels),
            "context": "corpus passages" if corpus else "training rows", "columns": columns}


def tables(study: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows): the summary (one line per column) and per-class F1 side by side."""
    cols = study["columns"]
    summary = [[c["name"], f"{100 * c['report']['accuracy']:.1f}%", f"{100 * c['report']['macro_f1']:.1f}%",
                f"{c['prompt_tokens_per_row']:.0f}", f"{1000 * c['seconds_per_row']:.1f}"] for c in cols]
    per_class = [[label] + [f"{100 * c['report']['per_class'][label]['f1']:.1f}" for c in cols]
                 for label in study["labels"]]
    return [(f"Baselines beside the adapter ({study['rows']} rows, seed {study['seed']})",
             ["model", "accuracy", "macro-F1", "prompt tokens", "ms/row"], summary),
            ("Per-class F1 (%)", ["class"] + [c["name"] for c in cols], per_class)]


def to_markdown(study: dict) -> str:
    lines = ["# Baselines", "",
             f"The base model prompted zero-shot, with K training rows as examples, and with the K "
             f"most similar {study['context']} (BM25) on the same {study['rows']} rows as the "
             "adapter; every answer decoded constrained to the label set. ms/row: decoding time "
             "per row, batched.", ""]
    for title, header, rows in tables(study):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def write_baselines(study: dict, out_dir: str | Path) -> tuple[Path, Path]:
    from lorakit.atomic import write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / BASELINES_JSON, json.dumps(study, indent=2, ensure_ascii=False) + "\n")
    write_text(out / BASELINES_MD, to_markdown(study))
    return out / BASELINES_JSON, out / BASELINES_MD


def print_baselines(study: dict, console) -> None:
    from rich.table import Table

    for title, header, rows in tables(study):
        table = Table(title=title, title_justify="left")
        table.add_column(header[0], no_wrap=True)
        for h in header[1:]:
            table.add_column(h, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
