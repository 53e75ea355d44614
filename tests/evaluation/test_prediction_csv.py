"""The predictions CSV round-trips through csv.DictReader and marks unreadable images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

from vittune.data.decode import read_image
from vittune.errors import DataError
from vittune.evaluation.inputs import expand_inputs
from vittune.evaluation.prediction_csv import write_predictions

CLASSES = ["cat", "dog", "owl", "fox"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def brightness_probs(image: np.ndarray) -> np.ndarray:
    """A stand-in model: a softmax over distances of the mean brightness to 4 levels."""
    logits = -10.0 * np.abs(image.mean() - np.array([0.1, 0.4, 0.6, 0.9]))  # [4]
    return np.exp(logits) / np.exp(logits).sum()


def test_single_label_rows_with_an_unreadable_image(tmp_path: Path) -> None:
    for name, level in [("dark.png", 20), ("light.png", 230)]:
        write_image(tmp_path / "in" / name, np.full((8, 8), level, dtype=np.uint8))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    paths = expand_inputs([tmp_path / "in"])
    probs, errors = np.full((len(paths), 4), np.nan), []
    for i, path in enumerate(paths):  # what `vittune predict` will do, minus the model
        try:
            probs[i] = brightness_probs(read_image(path, in_chans=1))
            errors.append(None)
        except DataError as error:
            errors.append(str(error))
    out = write_predictions(tmp_path / "out" / "preds.csv", paths, probs, CLASSES, errors=errors)

    rows = read_csv(out)
    assert list(rows[0]) == [
        "path", "predicted", "probability",
        "top1_class", "top1_prob", "top2_class", "top2_prob", "top3_class", "top3_prob",
        "error",
    ]  # fmt: skip
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "dark.png", "light.png"]
    broken, dark, light = rows
    assert "cannot decode image" in broken["error"]
    assert broken["predicted"] == broken["probability"] == broken["top1_class"] == ""
    assert (dark["predicted"], light["predicted"], dark["error"]) == ("cat", "fox", "")
    for row, p in zip(rows[1:], probs[1:], strict=True):
        order = np.argsort(-p)
        assert [row[f"top{i}_class"] for i in (1, 2, 3)] == [CLASSES[c] for c in order[:3]]
        got = [float(row[f"top{i}_prob"]) for i in (1, 2, 3)]
        np.testing.assert_allclose(got, p[order[:3]], rtol=1e-5)
        assert row["probability"] == row["top1_prob"]


def test_top_k_is_capped_at_the_number_of_classes(tmp_path: Path) -> None:
    out = write_predictions(tmp_path / "p.csv", ["x.png"], np.array([[0.3, 0.7]]), ["a", "b"])
    (row,) = read_csv(out)
    assert (row["top1_class"], row["top2_class"], row["top1_prob"]) == ("b", "a", "0.7")
    assert "top3_class" not in row


def test_multi_label_lists_labels_above_their_threshold(tmp_path: Path) -> None:
    probs = np.array([[0.9, 0.45, 0.5], [0.1, 0.2, 0.3], [np.nan] * 3])
    out = write_predictions(
        tmp_path / "p.csv",
        ["a.png", "b.png", "c.png"],
        probs,
        ["edema", "nodule", "mass, left"],  # a comma in a name is quoted, not split
        errors=[None, None, "cannot decode image c.png:\nbroken"],
        multi_label=True,
        threshold=[0.5, 0.4, 0.5],
    )
    rows = read_csv(out)
    assert list(rows[0]) == [
        "path",
        "labels",
        "prob_edema",
        "prob_nodule",
        "prob_mass, left",
        "error",
    ]
    assert rows[0]["labels"] == "edema;nodule"  # 0.5 is not above 0.5
    assert rows[1]["labels"] == ""
    assert float(rows[0]["prob_nodule"]) == 0.45
    assert rows[2]["error"] == "cannot decode image c.png: broken" and rows[2]["labels"] == ""


def test_mismatched_lengths_are_a_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one probs row"):
        write_predictions(tmp_path / "p.csv", ["a.png"], np.zeros((2, 2)), ["a", "b"])
