"""classification_report against numbers worked out by hand (sklearn's definitions, zero_division=0)."""

import pytest

from lorakit.errors import LorakitError
from lorakit.eval.metrics import classification_report

# Rows true / columns predicted, labels a b c d (d has no rows and is never predicted):
#   a: 2 1 0 0     a: P = 2/2, R = 2/3, F1 = 0.8
#   b: 0 1 1 0     b: P = 1/2, R = 1/2, F1 = 0.5
#   c: 0 0 1 0     c: P = 1/2, R = 1/1, F1 = 2/3
#   d: 0 0 0 0     d: P = R = F1 = 0 (zero division -> 0.0)
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]
LABELS = ["a", "b", "c", "d"]


def test_hand_computed_numbers():
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["correct"] == 4 and r["rows"] == 6 and r["unlisted_predictions"] == 0
    pc = r["per_class"]
    assert pc["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3, "predicted": 2})
    assert pc["b"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2})
    assert pc["c"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1, "predicted": 2})
    assert pc["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    assert r["macro_precision"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
    assert r["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1 + 0) / 4)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0) / 4)
    assert r["weighted_f1"] == pytest.approx((0.8 * 3 + 0.5 * 2 + 2 / 3 * 1) / 6)
    assert r["weighted_recall"] == pytest.approx(4 / 6)  # weighted recall is always accuracy
    assert r["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_label_order_sets_matrix_order():
    r = classification_report(Y_TRUE, Y_PRED, ["c", "b", "a"])
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 1, 2]]
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_perfect_and_all_wrong():
    perfect = classification_report(["x", "y", "y"], ["x", "y", "y"], ["x", "y"])
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0 and perfect["weighted_f1"] == 1.0
    wrong = classification_report(["x", "y"], ["y", "x"], ["x", "y"])
    assert wrong["accuracy"] == 0.0 and wrong["macro_f1"] == 0.0
    assert wrong["confusion_matrix"] == [[0, 1], [1, 0]]


def test_unlisted_prediction_counts_as_wrong_and_stays_out_of_the_matrix():
    r = classification_report(["a", "b", "b"], ["a", "maybe", "b"], ["a", "b"])
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["unlisted_predictions"] == 1
    assert r["per_class"]["b"]["support"] == 2
    assert r["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert r["per_class"]["b"]["precision"] == 1.0
    assert r["confusion_matrix"] == [[1, 0], [0, 1]]


def test_bad_input_is_named():
    with pytest.raises(LorakitError, match="row 1 has true label 'zz'"):
        classification_report(["a", "zz"], ["a", "a"], ["a", "b"])
    with pytest.raises(LorakitError, match="2 true labels but 1 predictions"):
        classification_report(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(LorakitError, match="repeats"):
        classification_report(["a"], ["a"], ["a", "a"])
