"""`lorakit eval`: one model on held-out rows, the base beside the adapter, and the written report.

`evaluate` scores one model: loss and perplexity on the supervised tokens always; for
classification data it also decodes every row's answer constrained to the label set
(`classify.predict_labels`) and computes accuracy, per-class precision/recall/F1, macro- and
weighted-F1 and the confusion matrix (`metrics.classification_report`). `compare` puts two such
results for the same rows side by side, and `write_report` / `print_report` render them as the
table of the study in the material: base model with a good prompt vs the LoRA adapter, per-class
F1 on the same test points (the brief's marketplace-intent study, 36% -> 88% accuracy).

Task detection ("auto"): the data is classification when the answers form a small categorical
set: 2 to 50 distinct answers, fewer distinct answers than rows, and every answer a single line of
at most 40 characters. Anything else is generation (loss and perplexity only).

Label hint: the base model must know the label set to be judged fairly. The bundled study's rows
already list the labels in their instruction, so base and adapter see the same prompt. With
`label_hint=True`, a row whose prompt text does not mention every label (case-insensitive
substring) gets "Answer with exactly one of: a, b, c." as a system message: appended to the
row's existing system message, or inserted as the first message when there is none (a system
message anywhere else is rejected by many chat templates). The hint changes the prompt used for
both the predictions and the loss, and the result records how many rows received it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from lorakit.atomic import make_folder, write_text
from lorakit.errors import DataError, LorakitError
from lorakit.eval.metrics import classification_report

MAX_CLASSES = 50
MAX_LABEL_CHARS = 40
REPORT_JSON, REPORT_MD, ANSWERS_JSONL = "report.json", "report.md", "answers.jsonl"


def answer_of(ex) -> str:
    """The reference answer of an example: its label, else the last (assistant) message."""
    return ex.label if ex.label is not None else ex.messages[-1]["content"]


def detect_task(examples) -> str:
    """'classification' when the answers are a small categorical set (see module docstring)."""
    answers = [answer_of(ex) for ex in examples]
    distinct = set(answers)
    short = all(len(a) <= MAX_LABEL_CHARS and "\n" not in a.strip() for a in distinct)
    if short and 2 <= len(distinct) <= MAX_CLASSES and len(distinct) < len(answers):
        return "classification"
    return "generation"


def with_label_hint(ex, labels: list[str]):
    """The example with "Answer with exactly one of: ..." added when its prompt misses a label."""
    prompt_text = "\n".join(m["content"] for m in ex.messages[:-1]).lower()
    if all(label.lower() in prompt_text for label in labels):
        return ex
    hint = "Answer with exactly one of: " + ", ".join(labels) + "."
    messages = [dict(m) for m in ex.messages]
    if messages[0]["role"] == "system":
        messages[0]["content"] = messages[0]["content"].rstrip() + "\n\n" + hint
    else:
        messages.insert(0, {"role": "system", "content": hint})
    return dataclasses.replace(ex, messages=tuple(messages))


@contextmanager
def _progress_bar(enabled: bool, description: str, total: int):
    """A rich progress bar over rows, advanced by the callable it yields (a no-op when disabled)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def evaluate(model, tokenizer, examples, task: str = "auto", max_seq_len: int = 512,
             batch_size: int = 16, progress: bool = True, label_hint: bool = False,
             labels: list[str] | None = None, end_token_id: int | None = None,
             generate: bool = True, max_new_tokens: int = 0) -> dict:
    """Score one model on `examples` (a list of `lorakit.data.formats.Example`).

    `task` is "auto", "classification" or "generation". `labels` fixes the label set and its
    order (default: the distinct answers, sorted). Returns a JSON-ready dict with task, rows,
    loss, perplexity, tokens, seconds and, for classification, labels, y_true, predictions,
    hinted_rows and report (see `metrics.classification_report`). For generation (with
    `generate`) it also answers every row greedily (`lorakit.eval.generate`, batched) with up to
    `max_new_tokens` (0: twice the longest expected answer's tokens plus 16) and adds answers,
    expected, exact_match and normalised_match (`metrics.match_scores`).
    """
    from lorakit.data.render import encode_prompt
    from lorakit.eval.classify import predict_labels
    from lorakit.eval.perplexity import supervised_loss

    if not examples:
        raise DataError("evaluate: no examples (expected at least one held-out row)")
    if task not in ("auto", "classification", "generation"):
        raise LorakitError(f"evaluate: task {task!r} (expected auto, classification or generation)")
    started = time.perf_counter()
    if task == "auto":
        task = "classification" if labels else detect_task(examples)
    result: dict = {"task": task, "rows": len(examples)}
    if task == "classification":
        y_true = [answer_of(ex) for ex in examples]
        labels = list(labels) if labels else sorted(set(y_true))
        unknown = sorted(set(y_true) - set(labels))
        if unknown:
            ex = next(e for e in examples if answer_of(e) in unknown)
            raise DataError(f"{ex.source}:{ex.line}: answer {answer_of(ex)!r} is not in the label "
                            f"set {labels}")
        if label_hint:
            hinted = [with_label_hint(ex, labels) for ex in examples]
            result["hinted_rows"] = sum(h is not ex for h, ex in zip(hinted, examples))
            examples = hinted
        else:
            result["hinted_rows"] = 0
        prompts = [encode_prompt(list(ex.messages[:-1]), tokenizer) for ex in examples]
        with _progress_bar(progress, "classifying", len(examples)) as advance:
            predictions = predict_labels(model, tokenizer, prompts, labels, batch_size=batch_size,
                                         end_token_id=end_token_id, on_rows=advance)
        result.update(labels=labels, y_true=y_true, predictions=predictions,
                      report=classification_report(y_true, predictions, labels))
    if task == "generation" and generate:
        from lorakit.eval.generate import greedy_answers
        from lorakit.eval.metrics import match_scores

        expected = [answer_of(ex) for ex in examples]
        if not max_new_tokens:
            longest = max(len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected)
            max_new_tokens = 2 * longest + 16
        prompts = [encode_prompt(list(ex.messages[:-1]), tokenizer) for ex in examples]
        with _progress_bar(progress, "generating", len(examples)) as advance:
            answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size,
                                     end_token_id=end_token_id, on_rows=advance)
        result.update(expected=expected, answers=answers, max_new_tokens=max_new_tokens,
                      **match_scores(expected, answers))
    with _progress_bar(progress, "scoring loss", len(examples)) as advance:
        result.update(supervised_loss(model, tokenizer, examples, max_seq_len=max_seq_len,
                                      batch_size=batch_size, on_rows=advance))
    result["seconds"] = time.perf_counter() - started
    return result


def compare(base_result: dict, adapter_result: dict, labels: list[str] | None) -> dict:
    """Base and adapter results for the same rows, side by side, with the changes between them.

    With `labels`, both classification reports are recomputed on that label list and order, so
    the two columns of every table line up. The row counts "adapter_only" / "base_only" say on
    how many rows exactly one of the two models was right.
    """
    if base_result["rows"] != adapter_result["rows"] or base_result["task"] != adapter_result["task"]:
        raise LorakitError(f"compare: base has {base_result['rows']} {base_result['task']} rows, adapter "
                           f"{adapter_result['rows']} {adapter_result['task']} rows (expected the same rows)")
    base, adapter = dict(base_result), dict(adapter_result)
    out: dict = {"task": base["task"], "rows": base["rows"], "labels": None, "base": base, "adapter": adapter}
    delta = {"loss": adapter["loss"] - base["loss"]}
    if base["task"] == "classification":
        if base["y_true"] != adapter["y_true"]:
            row = next(i for i, (a, b) in enumerate(zip(base["y_true"], adapter["y_true"])) if a != b)
            raise LorakitError(f"compare: row {row} has answer {base['y_true'][row]!r} for the base and "
                               f"{adapter['y_true'][row]!r} for the adapter (expected the same rows)")
        labels = list(labels) if labels else list(adapter["labels"])
        for r in (base, adapter):
            if r["labels"] != labels:
                r["labels"] = labels
                r["report"] = classification_report(r["y_true"], r["predictions"], labels)
        out["labels"] = labels
        for key in ("accuracy", "macro_f1", "weighted_f1"):
            delta[key] = adapter["report"][key] - base["report"][key]
        right_b = [t == p for t, p in zip(base["y_true"], base["predictions"])]
        right_a = [t == p for t, p in zip(adapter["y_true"], adapter["predictions"])]
        pairs = list(zip(right_b, right_a))
        out["agreement"] = {"both_right": pairs.count((True, True)), "adapter_only": pairs.count((False, True)),
                            "base_only": pairs.count((True, False)), "both_wrong": pairs.count((False, False))}
    elif "answers" in base and "answers" in adapter:
        from lorakit.eval.metrics import normalise_answer

        for key in ("exact_match", "normalised_match"):
            delta[key] = adapter[key] - base[key]
        right_b = [normalise_answer(e) == normalise_answer(a) for e, a in zip(base["expected"], base["answers"])]
        right_a = [normalise_answer(e) == normalise_answer(a) for e, a in zip(adapter["expected"], adapter["answers"])]
        pairs = list(zip(right_b, right_a))
        out["agreement"] = {"both_right": pairs.count((True, True)), "adapter_only": pairs.count((False, True)),
                            "base_only": pairs.count((True, False)), "both_wrong": pairs.count((False, False))}
        out["answers_changed"] = sum(a != b for a, b in zip(base["answers"], adapter["answers"]))
    out["delta"] = delta
    return out


def _columns(results: dict) -> list[tuple[str, dict]]:
    """The (name, result) columns of a report: base and/or adapter, or one bare result."""
    cols = [(name, results[name]) for name in ("base", "adapter") if isinstance(results.get(name), dict)]
    if not cols and "task" in results:
        cols = [("model", results)]
    if not cols:
        raise LorakitError("report: expected a result from evaluate() or a dict with 'base'/'adapter' results")
    return cols


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "inf"


def _tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table in the report, shared by Markdown and rich output."""
    cols = _columns(results)
    names = [name for name, _ in cols]
    classification = all(r["task"] == "classification" for _, r in cols)
    change = len(cols) == 2
    summary = []

    def line(metric: str, values: list[float], fmt, delta_fmt):
        row = [metric] + [fmt(v) for v in values]
        if change:
            row.append(delta_fmt(values[1] - values[0]))
        summary.append(row)

    if classification:
        for metric, key in (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("weighted-F1", "weighted_f1")):
            line(metric, [r["report"][key] for _, r in cols], _pct, lambda d: f"{100 * d:+.1f} pts")
    if all("exact_match" in r for _, r in cols):
        for metric, key in (("exact match", "exact_match"), ("normalised match", "normalised_match")):
            line(metric, [r[key] for _, r in cols], _pct, lambda d: f"{100 * d:+.1f} pts")
    line("loss", [r["loss"] for _, r in cols], _num, lambda d: f"{d:+.4f}")
    line("perplexity", [r["perplexity"] for _, r in cols], lambda v: _num(v, 3),
         lambda d: f"{d:+.3f}" if math.isfinite(d) else "")
    line("supervised tokens", [r["tokens"] for _, r in cols], str, lambda d: "")
    tables = [("Summary", ["metric"] + names + (["change"] if change else []), summary)]
    if not classification:
        return tables

    labels = cols[-1][1]["labels"]
    header = ["class", "support"] + [f"{n} {m}" for n in names for m in ("P", "R", "F1")]
    per_class = []
    for label in labels:
        support = cols[-1][1]["report"]["per_class"][label]["support"]
        row = [label, str(support)]
        for _, r in cols:
            c = r["report"]["per_class"][label]
            row += [_pct(c["precision"]), _pct(c["recall"]), _pct(c["f1"])]
        per_class.append(row)
    macro = ["macro", str(cols[-1][1]["rows"])]
    for _, r in cols:
        rep = r["report"]
        macro += [_pct(rep["macro_precision"]), _pct(rep["macro_recall"]), _pct(rep["macro_f1"])]
    per_class.append(macro)
    tables.append(("Per class", header, per_class))

    name, last = cols[-1]
    matrix = [[label] + [str(v) for v in counts] for label, counts in zip(labels, last["report"]["confusion_matrix"])]
    tables.append((f"Confusion matrix ({name}; rows true, columns predicted)", ["true \\ predicted"] + labels, matrix))
    return tables


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(results: dict) -> str:
    """The report as Markdown: summary, per-class P/R/F1 side by side, confusion matrix."""
    cols = _columns(results)
    first = cols[0][1]
    lines = ["# Evaluation report", "",
             f"{first['rows']} rows, task {first['task']}"
             + (f", {len(first['labels'])} labels" if first.get("labels") else "")
             + f"; columns: {', '.join(name for name, _ in cols)}.", ""]
    for _, r in cols:
        if r.get("hinted_rows"):
            lines += [f"The label list was added to the prompt of {r['hinted_rows']} rows.", ""]
            break
    if "forgetting" in results:
        from lorakit.eval.forgetting import summary_line

        lines += [summary_line(results["forgetting"]).capitalize() + ".", ""]
    if "answers_changed" in results:
        lines += [f"The adapter's answer differs from the base's on {results['answers_changed']} of "
                  f"{first['rows']} rows (every answer: {ANSWERS_JSONL}).", ""]
    if "agreement" in results:
        a = results["agreement"]
        lines += [f"Rows only the adapter gets right: {a['adapter_only']}; only the base: "
                  f"{a['base_only']}; both: {a['both_right']}; neither: {a['both_wrong']}.", ""]
    for title, header, rows in _tables(results):
        lines += [f"## {title}", "", "| " + " | ".join(_md_cell(h) for h in header) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def json_ready(obj):
    """`obj` with NaN and Infinity (an overflowed perplexity) as None: standard JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def answer_rows(results: dict, examples=None) -> list[dict] | None:
    """Per row of a generation report: prompt, expected, and each column's answer (base,
    adapter), or None when no column generated answers."""
    cols = [(name, r) for name, r in _columns(results) if "answers" in r]
    if not cols:
        return None
    rows = []
    for i, expected in enumerate(cols[0][1]["expected"]):
        row = {"row": i + 1}
        if examples is not None:
            row["prompt"] = "\n\n".join(m["content"] for m in examples[i].messages[:-1])
        row["expected"] = expected
        row.update({name: r["answers"][i] for name, r in cols})
        rows.append(row)
    return rows


def write_report(results: dict, out_dir, examples=None) -> tuple[Path, Path]:
    """Write report.json (everything, including per-row predictions) and report.md into out_dir;
    for generation also answers.jsonl (prompt, expected, base and adapter answer per row, the
    prompt when `examples` are given)."""
    out = make_folder(Path(out_dir), "report folder")
    md = to_markdown(results)
    json_path, md_path = out / REPORT_JSON, out / REPORT_MD
    rows = answer_rows(results, examples)
    if rows is not None:
        write_text(out / ANSWERS_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text(json_path, json.dumps(json_ready(results), indent=2, ensure_ascii=False) + "\n")
    write_text(md_path, md)
    return json_path, md_path


SHOWN_CLASSES = 5  # per-class rows printed at each end when the whole table does not fit


def print_report(results: dict, console=None, full_report: str = "report.md") -> None:
    """The report's tables on the terminal (rich), as many as fit its width: the summary always;
    the per-class table whole when it fits, else the best and worst classes by F1; the confusion
    matrix when it fits. A line points to `full_report` for what was left out."""
    from rich.console import Console

    console = console or Console()
    left_out = []
    for title, header, rows in _tables(results):
        if title == "Per class":
            table = _rich_table(title, header, rows, console.width)
            if not _fits(console, table):
                title = _shown_classes_title(results, len(rows) - 1)
                header, rows = _f1_columns(results, header, rows)
                table = _rich_table(title, header, rows, console.width)
                left_out.append("precision and recall of every class")
        else:
            table = _rich_table(title, header, rows, console.width)
            if not _fits(console, table):
                left_out.append(f"the {len(rows)} x {len(rows)} confusion matrix")
                continue
        console.print(table)
    if "agreement" in results:
        a = results["agreement"]
        console.print(f"rows only the adapter gets right: {a['adapter_only']}, only the base: {a['base_only']}")
    if "forgetting" in results:
        from lorakit.eval.forgetting import summary_line

        console.print(summary_line(results["forgetting"]), highlight=False, soft_wrap=True)
    if left_out:
        console.print(f"not shown at this width: {' and '.join(left_out)}; the full tables are "
                      f"in {full_report} (and report.json)", soft_wrap=False)


def _rich_table(title, header, rows, width):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    # Class names stay on one line, cut with an ellipsis only when the console is too narrow; the
    # numeric headers ("adapter F1") stack to keep the table narrow.
    table.add_column(header[0], no_wrap=True, overflow="ellipsis",
                     min_width=min(max(len(r[0]) for r in rows), max(8, width // 3)))
    for h in header[1:]:
        table.add_column(h.replace(" ", "\n"), justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _fits(console, table) -> bool:
    from rich.measure import Measurement

    # Measured without the console's limit, which would clamp the answer to the console width.
    wide = console.options.update_width(1 << 16)
    return Measurement.get(console, wide, table).maximum <= console.width


def _shown_classes_title(results, n_classes: int) -> str:
    name = _columns(results)[-1][0]
    if n_classes <= 2 * SHOWN_CLASSES:
        return f"Per class: F1 of the {n_classes} classes, best first by {name} F1"
    return (f"Per class: the {SHOWN_CLASSES} best and {SHOWN_CLASSES} worst of {n_classes} "
            f"by {name} F1")


def _f1_columns(results, header, rows):
    """The per-class table cut to F1 (and the change) for the best and worst classes by the last
    column's F1, with a `...` row between and the macro row last."""
    cols = _columns(results)
    f1_at = [header.index(f"{name} F1") for name, _ in cols]
    new_header = ["class", "support"] + [f"{name} F1" for name, _ in cols]
    if len(cols) == 2:
        new_header.append("change")

    def f1(result, label):
        rep = result["report"]
        return rep["macro_f1"] if label is None else rep["per_class"][label]["f1"]

    def cut(row, label):
        out = [row[0], row[1]] + [row[i] for i in f1_at]
        if len(cols) == 2:
            out.append(f"{100 * (f1(cols[1][1], label) - f1(cols[0][1], label)):+.1f} pts")
        return out

    classes, macro = rows[:-1], rows[-1]
    ranked = sorted(classes, key=lambda r: (-f1(cols[-1][1], r[0]), r[0]))
    if len(ranked) > 2 * SHOWN_CLASSES:
        skipped = len(ranked) - 2 * SHOWN_CLASSES
        gap = [f"... {skipped} more", ""] + [""] * (len(new_header) - 2)
        shown = [cut(r, r[0]) for r in ranked[:SHOWN_CLASSES]] + [gap] + \
            [cut(r, r[0]) for r in ranked[-SHOWN_CLASSES:]]
    else:
        shown = [cut(r, r[0]) for r in ranked]
    return new_header, shown + [cut(macro, None)]
