"""Classification metrics as pure functions: accuracy, per-class P/R/F1, macro/weighted F1, confusion.

The definitions are scikit-learn's `classification_report` / `precision_recall_fscore_support`
with `zero_division=0` and an explicit `labels` order, written out without sklearn so lorakit
does not depend on it:

    precision_c = TP_c / (TP_c + FP_c)      (0.0 when nothing was predicted as c)
    recall_c    = TP_c / (TP_c + FN_c)      (0.0 when c has no true rows)
    f1_c        = 2 P R / (P + R)           (0.0 when P + R = 0)
    macro       = unweighted mean over the given labels (labels with no support count as 0.0)
    weighted    = mean weighted by support

The confusion matrix has one row per true label and one column per predicted label, both in the
order given. Every true label must be in `labels`; a prediction outside `labels` (free-form
generation) counts as wrong and is reported under `unlisted_predictions` rather than in the matrix.
"""

from __future__ import annotations

from lorakit.errors import LorakitError


def _safe_div(num: float, den: float) -> float:
    # sklearn's zero_division=0: an undefined ratio is reported as 0.0, not NaN and not a warning.
    return num / den if den else 0.0


def confusion_matrix(y_true: list[str], y_pred: list[str], labels: list[str]) -> list[list[int]]:
    """Counts[i][j] = rows whose true label is labels[i] and prediction is labels[j]."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


def _check(y_true: list[str], y_pred: list[str], labels: list[str]) -> None:
    if len(y_true) != len(y_pred):
        raise LorakitError(f"classification_report: {len(y_true)} true labels but {len(y_pred)} "
                           "predictions (expected one prediction per row)")
    if not y_true:
        raise LorakitError("classification_report: no rows (expected at least one)")
    if len(set(labels)) != len(labels):
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        raise LorakitError(f"classification_report: label list repeats {dupes} (expected each once)")
    known = set(labels)
    for row, t in enumerate(y_true):
        if t not in known:
            raise LorakitError(f"classification_report: row {row} has true label {t!r}, which is not "
                               f"in the label list {labels}")


def classification_report(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted averages, confusion matrix.

    Returns a JSON-ready dict:
        labels, rows, accuracy, correct, unlisted_predictions,
        per_class: {label: {precision, recall, f1, support, predicted}},
        macro_precision, macro_recall, macro_f1, weighted_precision, weighted_recall, weighted_f1,
        confusion_matrix (rows true, columns predicted, in `labels` order).
    """
    labels = list(labels)
    _check(y_true, y_pred, labels)
    matrix = confusion_matrix(y_true, y_pred, labels)
    n = len(y_true)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    known = set(labels)

    per_class: dict[str, dict] = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])  # every true row is in the matrix unless its prediction is unlisted
        support += sum(1 for t, p in zip(y_true, y_pred) if t == label and p not in known)
        predicted = sum(matrix[r][i] for r in range(len(labels)))
        precision = _safe_div(tp, predicted)
        recall = _safe_div(tp, support)
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": _safe_div(2 * precision * recall, precision + recall),
            "support": support,
            "predicted": predicted,
        }

    def macro(key: str) -> float:
        return sum(c[key] for c in per_class.values()) / len(labels) if labels else 0.0

    def weighted(key: str) -> float:
        return _safe_div(sum(c[key] * c["support"] for c in per_class.values()), n)

    return {
        "labels": labels,
        "rows": n,
        "accuracy": correct / n,
        "correct": correct,
        "unlisted_predictions": sum(1 for p in y_pred if p not in known),
        "per_class": per_class,
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "weighted_precision": weighted("precision"),
        "weighted_recall": weighted("recall"),
        "weighted_f1": weighted("f1"),
        "confusion_matrix": matrix,
    }


# -- generation: answers judged by their text --------------------------------------------------

def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016, the official evaluation script):
    lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def match_scores(expected: list[str], answers: list[str]) -> dict:
    """exact_match: the share of answers equal to the expected text (surrounding whitespace
    ignored); normalised_match: equal after `normalise_answer`."""
    if len(expected) != len(answers):
        raise LorakitError(f"match_scores: {len(expected)} expected answers, {len(answers)} answers")
    n = max(len(expected), 1)
    exact = sum(e.strip() == a.strip() for e, a in zip(expected, answers))
    normal = sum(normalise_answer(e) == normalise_answer(a) for e, a in zip(expected, answers))
    return {"exact_match": exact / n, "normalised_match": normal / n}
