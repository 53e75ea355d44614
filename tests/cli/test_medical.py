"""The medical path end to end: recipes/medical.yaml on a folder of generated DICOM files with
several images per patient, then `vittune evaluate` with an operating point and per-patient
scores, and `vittune predict` deciding with the saved threshold. A patient name planted in
every header must appear in no file the run writes, nor on the console."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from dicom_files import PLANTED_NAME, write_dicom, write_dicomdir
from helpers import ONE_THREAD, RECIPES, tiny
from pydicom.uid import JPEG2000Lossless, RLELossless
from sklearn.metrics import roc_auc_score


def _dicom_patients(root: Path, patients: int = 24, views: int = 3) -> None:
    """root/<class>/P<id>_<view>.dcm in every flavour the reader handles; the finding is a
    bright square. A DICOMDIR and a truncated file sit among them."""
    rng = np.random.default_rng(7)
    for patient in range(patients):
        label = "finding" if patient % 2 else "normal"
        for view in range(views):
            stored = rng.integers(200, 1400, (32, 32))
            if label == "finding":
                stored[8:24, 8:24] += 2000
            kind = (patient + view) % 4
            path = root / label / f"P{patient:03d}_{view}.dcm"
            pid = f"P{patient:03d}"
            if kind == 0:  # 12-bit, windowed by its header
                write_dicom(
                    path,
                    stored.astype(np.uint16),
                    bits_stored=12,
                    window=(2000, 4000),
                    patient_id=pid,
                )
            elif kind == 1:  # MONOCHROME1: stored inverted, displayed the same way round
                write_dicom(
                    path,
                    (4095 - stored).astype(np.uint16),
                    bits_stored=12,
                    photometric="MONOCHROME1",
                    patient_id=pid,
                )
            elif kind == 2:  # signed CT values with a rescale, RLE-compressed
                write_dicom(
                    path,
                    (stored - 1024).astype(np.int16),
                    slope=1.0,
                    intercept=0.0,
                    syntax=RLELossless,
                    patient_id=pid,
                )
            else:  # JPEG 2000 lossless
                write_dicom(
                    path,
                    stored.astype(np.uint16),
                    bits_stored=12,
                    syntax=JPEG2000Lossless,
                    patient_id=pid,
                )
    good = root / "normal" / "P000_0.dcm"
    (root / "normal" / "P000_9.dcm").write_bytes(good.read_bytes()[:-300])  # truncated
    write_dicomdir(root / "normal" / "P000_set", good)  # a DICOMDIR (+ its own copy of P000_0)


def _all_text(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_medical_recipe_trains_on_dicom_by_patient(tmp_path: Path) -> None:
    data = tmp_path / "dicom"
    _dicom_patients(data)
    overrides = tiny(
        f"data.root={data}",
        r"data.group_pattern='(P\d+)_'",
        "data.test_fraction=0.25",
        "data.val_fraction=0.25",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "schedule.warmup_epochs=0",
        "logging.name=run",
        "logging.wandb=true",  # offline (conftest): its files are searched for the name too
    )
    result = run_cli(
        "finetune", str(RECIPES / "medical.yaml"), *overrides, cwd=tmp_path, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test AUROC macro" in result.stdout and "95% CI" in result.stdout
    run = tmp_path / "runs" / "run"
    assert list((run / "wandb").glob("offline-run-*"))
    with (run / "splits.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    split_of: dict[str, set[str]] = {}
    for row in rows:
        split_of.setdefault(row["group"], set()).add(row["split"])
    assert len(split_of) == 24 and all(len(s) == 1 for s in split_of.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert not any("P000_set" in r["path"] and r["path"].endswith("DICOMDIR") for r in rows)
    corrupt = (run / "corrupt_files.txt").read_text()  # written when training ends
    assert "DICOMDIR" in corrupt
    # the truncated file fails when decoded: in training's summary, or (its patient in test)
    # among the files the end-of-training test report could not score
    skipped = (run / "eval" / "test" / "metrics.json").read_text()
    assert "P000_9.dcm" in corrupt + skipped

    evaluated = run_cli(
        "evaluate",
        str(run),
        "--operating-point",
        "spec=0.8",
        "--aggregate",
        "max",
        "--name",
        "op",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "95% CI" in evaluated.stdout and "operating point spec=0.8" in evaluated.stdout
    metrics = json.loads((run / "eval" / "op" / "metrics.json").read_text())
    with (run / "eval" / "op" / "predictions.csv").open() as handle:
        predicted = list(csv.DictReader(handle))
    truth = np.array([Path(p["path"]).parent.name == "finding" for p in predicted], int)
    finding = np.array(
        [float(p[f"top{1 if p['top1_class'] == 'finding' else 2}_prob"]) for p in predicted]
    )
    assert metrics["clinical"]["auroc_macro"] == pytest.approx(
        roc_auc_score(truth, finding), abs=1e-5
    )
    low, high = metrics["auroc_macro_ci95"]
    assert low <= metrics["clinical"]["auroc_macro"] <= high
    with (run / "eval" / "op" / "per_class.csv").open() as handle:
        assert {"auroc_ci95_low", "auroc_ci95_high"} <= set(next(csv.DictReader(handle)))
    assert metrics["clinical"]["group_level"]["groups"] == len(
        {r["group"] for r in rows if r["split"] == "test"}
    )
    threshold = json.loads((run / "operating_point.json").read_text())["thresholds"]["finding"]
    assert (run / "eval" / "test" / "metrics.json").is_file()  # the end-of-training report
    report_ci = json.loads((run / "eval" / "test" / "metrics.json").read_text())["auroc_macro_ci95"]
    # the run's own metrics.json carries the same interval beside the test numbers
    assert json.loads((run / "metrics.json").read_text())["test"]["auroc_macro_ci95"] == report_ci

    out = tmp_path / "predictions.csv"
    predicted = run_cli(
        "predict", str(run), str(data / "finding"), "--out", str(out), cwd=tmp_path, env=ONE_THREAD
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with out.open() as handle:
        for row in csv.DictReader(handle):
            p = float(row[f"top{1 if row['top1_class'] == 'finding' else 2}_prob"])
            assert row["decision_finding"] == str(int(p >= threshold))

    planted = PLANTED_NAME.encode()
    assert planted not in _all_text(run) + out.read_bytes(), "a patient name was written"
    assert planted.split(b"^")[0] not in _all_text(run)
    for output in (result, evaluated, predicted):
        assert PLANTED_NAME.split("^")[0] not in output.stdout + output.stderr
