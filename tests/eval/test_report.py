"""compare / write_report / print_report on hand-made results: the table rows carry the right numbers."""

import json
import math

import pytest
from rich.console import Console

from lorakit.errors import LorakitError
from lorakit.eval.metrics import classification_report
from lorakit.eval.run import compare, print_report, to_markdown, write_report

LABELS = ["price", "condition", "spam|ham"]  # a pipe in a label must not break the Markdown table
Y_TRUE = ["price", "price", "condition", "condition", "spam|ham", "spam|ham"]


def _result(predictions, loss, labels=LABELS):
    return {"task": "classification", "rows": len(Y_TRUE), "labels": list(labels), "y_true": list(Y_TRUE),
            "predictions": list(predictions), "hinted_rows": 0,
            "report": classification_report(Y_TRUE, predictions, labels),
            "loss": loss, "perplexity": math.exp(loss), "tokens": 18, "examples": 6,
            "answers_truncated": 0, "answers_dropped": 0, "seconds": 0.1}


# base: right on rows 0, 2, 4 (accuracy 50%); adapter: right on rows 0-4 (5/6).
BASE = _result(["price", "condition", "condition", "price", "spam|ham", "price"], 2.0)
ADAPTER = _result(["price", "price", "condition", "condition", "spam|ham", "condition"], 0.5)


def test_compare_deltas_and_agreement():
    c = compare(BASE, ADAPTER, LABELS)
    assert c["delta"]["accuracy"] == pytest.approx(5 / 6 - 3 / 6)
    assert c["delta"]["loss"] == pytest.approx(-1.5)
    assert c["agreement"] == {"both_right": 3, "adapter_only": 2, "base_only": 0, "both_wrong": 1}
    # base: price P=1/3 R=1/2 F1=0.4; condition P=1/2 R=1/2 F1=0.5; spam|ham P=1 R=1/2 F1=2/3
    assert c["base"]["report"]["macro_f1"] == pytest.approx((0.4 + 0.5 + 2 / 3) / 3)
    # adapter: price P=1 R=1 F1=1; condition P=2/3 R=1 F1=0.8; spam|ham P=1 R=1/2 F1=2/3
    assert c["adapter"]["report"]["macro_f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert c["delta"]["macro_f1"] == pytest.approx((1 + 0.8 - 0.4 - 0.5) / 3)


def test_compare_relabels_both_sides_in_the_given_order():
    order = ["spam|ham", "price", "condition"]
    c = compare(BASE, ADAPTER, order)
    assert c["labels"] == order
    assert c["adapter"]["report"]["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 2]]
    assert BASE["labels"] == LABELS  # the inputs are not modified


def test_compare_refuses_different_rows():
    other = dict(ADAPTER, y_true=list(reversed(Y_TRUE)))
    with pytest.raises(LorakitError, match="row 0 has answer 'price' for the base"):
        compare(BASE, other, LABELS)
    with pytest.raises(LorakitError, match="expected the same rows"):
        compare(BASE, dict(ADAPTER, rows=5), LABELS)


def test_markdown_rows():
    md = to_markdown(compare(BASE, ADAPTER, LABELS)).splitlines()
    assert "| metric | base | adapter | change |" in md
    assert "| accuracy | 50.0% | 83.3% | +33.3 pts |" in md
    assert "| macro-F1 | 52.2% | 82.2% | +30.0 pts |" in md
    assert "| loss | 2.0000 | 0.5000 | -1.5000 |" in md
    assert "| perplexity | 7.389 | 1.649 | -5.740 |" in md
    assert ("| class | support | base P | base R | base F1 | adapter P | adapter R | adapter F1 |") in md
    assert "| price | 2 | 33.3% | 50.0% | 40.0% | 100.0% | 100.0% | 100.0% |" in md
    assert "| spam\\|ham | 2 | 100.0% | 50.0% | 66.7% | 100.0% | 50.0% | 66.7% |" in md
    assert "| true \\ predicted | price | condition | spam\\|ham |" in md
    assert "| spam\\|ham | 0 | 1 | 1 |" in md  # adapter confusion matrix, row of the true class
    assert any("only the adapter gets right: 2; only the base: 0" in line for line in md)


def test_write_report_files(tmp_path):
    results = compare(BASE, ADAPTER, LABELS)
    json_path, md_path = write_report(results, tmp_path / "eval")
    assert json_path.name == "report.json" and md_path.name == "report.md"
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    assert md_path.read_text() == to_markdown(results)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["report.json", "report.md"]
    # Rewriting replaces the files whole.
    write_report({"adapter": ADAPTER}, tmp_path / "eval")
    assert "| accuracy | 83.3% |" in md_path.read_text()
    assert json.loads(json_path.read_text())["adapter"]["predictions"] == ADAPTER["predictions"]


def test_single_model_and_generation_reports(tmp_path):
    md = to_markdown({"base": BASE})
    assert "| metric | base |" in md and "change" not in md
    gen = {"task": "generation", "rows": 3, "loss": 800.0, "perplexity": math.inf, "tokens": 12}
    md = to_markdown(gen)
    assert "| loss | 800.0000 |" in md and "| perplexity | inf |" in md and "Per class" not in md
    json_path, _ = write_report(gen, tmp_path)
    assert json.loads(json_path.read_text())["perplexity"] is None  # standard JSON has no Infinity
    with pytest.raises(LorakitError, match="expected a result"):
        to_markdown({"nothing": 1})


def test_print_report_tables():
    console = Console(record=True, width=160)
    print_report(compare(BASE, ADAPTER, LABELS), console=console)
    text = console.export_text()
    assert "83.3%" in text and "+33.3 pts" in text and "spam|ham" in text
    assert "only the adapter gets right: 2" in text


def _many_classes(n=77, rows_per_class=4):
    """n intent-style labels (some long, as Banking77's are); the base is right on every 4th row
    of a class, the adapter on all but the last row of the first classes' half."""
    labels = [f"intent_{i:02d}_" + "card_payment_not_recognised"[: i % 28] for i in range(n)]
    y_true = [label for label in labels for _ in range(rows_per_class)]
    base = [t if i % 4 == 0 else labels[0] for i, t in enumerate(y_true)]
    adapter = [t if (i % 4 != 3 or labels.index(t) >= n // 2) else labels[-1]
               for i, t in enumerate(y_true)]

    def result(predictions):
        return {"task": "classification", "rows": len(y_true), "labels": labels,
                "y_true": y_true, "predictions": predictions, "hinted_rows": 0,
                "report": classification_report(y_true, predictions, labels), "loss": 1.0,
                "perplexity": math.e, "tokens": 100, "examples": len(y_true),
                "answers_truncated": 0, "answers_dropped": 0, "seconds": 1.0}

    return compare(result(base), result(adapter), labels), labels


def test_a_77_class_report_fits_80_columns():
    report, labels = _many_classes()
    console = Console(record=True, width=80)
    print_report(report, console=console, full_report="runs/r8/eval/report.md")
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "Per class: the 5 best and 5 worst of 77 by adapter F1" in text
    assert "... 67 more" in text
    # Best first: the second half's classes are all right for the adapter (F1 100%, ties by name).
    body = [line for line in lines if line.startswith("│ intent_")]
    assert len(body) == 10 and body[0].startswith(f"│ {labels[38]} ")
    assert "100.0%" in body[0]
    macro = next(line for line in lines if line.startswith("│ macro"))
    want = 100 * (report["adapter"]["report"]["macro_f1"] - report["base"]["report"]["macro_f1"])
    assert f"{want:+.1f} pts" in macro
    assert "confusion" not in text.replace("confusion matrix; the full", "")
    said = " ".join(text.split())
    assert ("not shown at this width: precision and recall of every class and the 77 x 77 "
            "confusion matrix; the full tables are in runs/r8/eval/report.md (and report.json)"
            in said)


def test_a_report_that_fits_is_printed_whole():
    console = Console(record=True, width=120)
    print_report(compare(BASE, ADAPTER, LABELS), console=console)
    text = console.export_text()
    assert "Per class" in text and "adapter\nF1" not in text and "not shown" not in text
    assert "Confusion matrix (adapter; rows true, columns" in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_report_folder_under_a_file(tmp_path):
    from lorakit.errors import StorageError

    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    with pytest.raises(StorageError) as info:
        write_report(compare(BASE, ADAPTER, LABELS), blocker / "eval")
    assert str(info.value) == (f"{blocker / 'eval'} (report folder): cannot create the folder (a "
                               "part of the path is a file, not a folder); expected a writable "
                               "folder with free space")
