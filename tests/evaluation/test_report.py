"""The report: checked inputs, strict JSON with NaN as null, and the console table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from vittune.evaluation.report import build_report, format_table


def case(n: int = 60, k: int = 3, absent: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k - 1 if absent else k, size=n)
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[targets]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, targets


def test_json_is_strict_and_nan_becomes_null_with_a_note() -> None:
    probs, targets = case(absent=True)
    report = build_report(probs, targets, ["cat", "dog", "owl"], temperature=True)
    text = report.to_json()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert data["overall"]["auroc_macro"] is None
    owl = data["per_class"][2]
    assert (owl["name"], owl["recall"], owl["auroc"], owl["support"]) == ("owl", None, None, 0)
    assert data["confusion_normalised"][2] == [None, None, None]
    assert data["overall"]["acc1"] == accuracy_score(targets, probs.argmax(axis=1))
    assert data["reliability"]["ece"] == data["overall"]["ece"]
    assert len(data["reliability"]["count"]) == 15 and sum(data["reliability"]["count"]) == 60
    assert data["temperature"]["temperature"] > 0
    assert any("macro AUROC is undefined" in note for note in data["notes"])
    assert data["mistakes"] == report.mistakes.tolist()


def test_table_prints_the_sklearn_numbers_and_the_notes() -> None:
    probs, targets = case(absent=True)
    report = build_report(probs, targets, ["cat", "dog", "owl"])
    table = format_table(report)
    preds = probs.argmax(axis=1)
    f1 = f1_score(targets, preds, labels=[0, 1, 2], average=None, zero_division=np.nan)
    assert f"{accuracy_score(targets, preds):.4f}" in table
    cat_row = next(line for line in table.splitlines() if line.startswith("cat "))
    assert f"{f1[0]:.4f}" in cat_row
    owl_row = next(line for line in table.splitlines() if line.startswith("owl "))
    assert owl_row.split()[2] == "NaN" and owl_row.split()[-1] == "0"  # recall, support
    assert "notes:" in table and "recall is undefined (NaN) for class owl" in table


def test_torch_tensors_and_multi_label_thresholds_are_accepted() -> None:
    probs = torch.tensor([[0.9, 0.4], [0.2, 0.8], [0.6, 0.3]])
    targets = torch.tensor([[1, 1], [0, 1], [1, 0]])
    report = build_report(probs, targets, ["a", "b"], threshold=[0.5, 0.35])
    assert report.multi_label and report.overall["subset_accuracy"] == 1.0
    assert json.loads(report.to_json())["threshold"] == [0.5, 0.35]


@pytest.mark.parametrize(
    ("probs", "targets", "message"),
    [
        (np.full((2, 3), 1 / 3), np.array([0, 3]), "class ids"),
        (np.full((2, 3), 0.5), np.array([0, 1]), "sum to 1"),
        (np.full((2, 2), 0.5), np.array([0, 1]), "class names"),
        (np.full((2, 3), 1 / 3), np.array([[0, 2, 1], [0, 0, 0]]), "0/1"),
        (np.array([[np.nan, 1, 0]]), np.array([0]), "finite"),
    ],
)
def test_inconsistent_inputs_are_refused(probs, targets, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_report(probs, targets, ["a", "b", "c"])


def test_a_temperature_at_the_end_of_its_range_is_flagged() -> None:
    targets = np.array([0, 1, 2, 0])
    probs = np.full((4, 3), 0.1) + 0.7 * np.eye(3)[targets]  # all right: sharper is always better
    report = build_report(probs, targets, ["a", "b", "c"], temperature=True)
    assert report.temperature.at_bound
    assert any("is no optimum" in note for note in report.notes)
    probs, targets = case(n=400)
    assert not build_report(probs, targets, ["a", "b", "c"], temperature=True).temperature.at_bound
