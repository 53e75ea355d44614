"""From a trained run to results: the test split after training, `vittune evaluate`, `vittune
predict` (checked against scikit-learn and plain timm on the same predictions) and
`vittune attention` (and its maps saved during training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import make_class_images, run_cli
from helpers import ONE_THREAD, run_in_process
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from vittune.data.decode import read_image
from vittune.data.transforms import build_eval_transform

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def trained(trained_run: Path) -> Path:
    return trained_run


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def plain_timm_probs(run: Path, paths: list[Path]) -> np.ndarray:
    """The exported weights in a plain timm model, images through the training transform."""
    config = json.loads((run / "config.json").read_text())
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=3,
        img_size=32,
        patch_size=8,
        in_chans=1,
        embed_dim=64,
        depth=2,
        num_heads=2,
    )
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    mean = config.get("mean") or config["pretrained_cfg"]["mean"]
    std = config.get("std") or config["pretrained_cfg"]["std"]
    transform = build_eval_transform((32, 32), tuple(mean), tuple(std))
    images = torch.stack([transform(image=read_image(p, 1))["image"] for p in paths])
    with torch.no_grad():
        return model.eval()(images).softmax(dim=-1).numpy()


@pytest.mark.slow
def test_the_test_split_is_scored_after_training_and_equals_evaluate(trained: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["monitor"] == "val/acc1" and metrics["best_epoch"] in (0, 1, 2)
    assert metrics["best_val"]["val/acc1"] == pytest.approx(metrics["best_score"])
    assert set(metrics) >= {"test", "test_last"}
    report = json.loads((trained / "eval" / "test" / "metrics.json").read_text())
    assert report["split"] == "test" and report["num_samples"] == 21
    # Lightning's trainer.test on the best checkpoint and evaluate's one-process report on the
    # export agree: the same weights, the same images.
    assert metrics["test"]["test/acc1"] == pytest.approx(report["overall"]["acc1"], abs=1e-6)
    assert metrics["test"]["test/f1"] == pytest.approx(report["overall"]["f1_macro"], abs=1e-6)
    assert metrics["test"]["test/auroc"] == pytest.approx(
        report["overall"]["auroc_macro"], abs=1e-5
    )
    for name in ("confusion_matrix.png", "reliability.png", "per_class.csv", "predictions.csv"):
        assert (trained / "eval" / "test" / name).is_file(), name


@pytest.mark.slow
def test_evaluate_numbers_equal_sklearn_and_plain_timm_on_the_same_predictions(
    trained: Path,
) -> None:
    result = run_cli("evaluate", str(trained), "--name", "again", cwd=trained, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on the test split: 21 images" in result.stdout and "specificity" in result.stdout
    folder = trained / "eval" / "again"
    report = json.loads((folder / "metrics.json").read_text())
    predicted = rows(folder / "predictions.csv")
    paths = [Path(r["path"]) for r in predicted]
    truth = np.array([CLASSES.index(p.parent.name) for p in paths])
    probs = plain_timm_probs(trained, paths)  # [21, 3], independent of vittune's loading
    ours = np.array([[float(r[f"top{k}_prob"]) for k in (1, 2, 3)] for r in predicted])
    np.testing.assert_allclose(np.sort(probs, axis=1)[:, ::-1], ours, atol=1e-5)
    assert [r["predicted"] for r in predicted] == [CLASSES[i] for i in probs.argmax(axis=1)]
    overall = report["overall"]
    assert overall["acc1"] == pytest.approx(accuracy_score(truth, probs.argmax(axis=1)))
    reference_f1 = f1_score(truth, probs.argmax(axis=1), average="macro", zero_division=np.nan)
    assert overall["f1_macro"] == pytest.approx(reference_f1, abs=1e-9)
    assert overall["auroc_macro"] == pytest.approx(
        roc_auc_score(truth, probs, multi_class="ovr", average="macro"), abs=1e-5
    )
    # The report at the end of training reuses trainer.test's predictions: each row is still
    # its own file's, as this second, independent pass over the files finds.
    at_end = rows(trained / "eval" / "test" / "predictions.csv")
    assert [r["path"] for r in at_end] == [r["path"] for r in predicted]
    for first, again in zip(at_end, predicted, strict=True):
        assert first["predicted"] == again["predicted"]
        for k in (1, 2, 3):
            assert float(first[f"top{k}_prob"]) == pytest.approx(
                float(again[f"top{k}_prob"]), abs=1e-5
            )


@pytest.mark.slow
def test_the_end_of_run_report_reuses_a_whole_test_pass_and_predicts_again_otherwise(
    trained: Path,
) -> None:
    from vittune.inference.evaluate import choose_samples, evaluate_run
    from vittune.inference.tested_split import TestedSplit
    from vittune.inference.trained_run import build_trained, load_trained_run

    run = load_trained_run(trained)
    found, _ = choose_samples(run, "test", False)
    dataset = build_trained(run, found).datamodule.dataset("val")
    truth = np.array([CLASSES.index(s.path.parent.name) for s in found.splits["val"]])
    wrong = np.eye(3)[(truth + 1) % 3]  # [21, 3]: every image confidently wrong
    reused = evaluate_run(
        trained, [], "test", name="reused", tested=TestedSplit(dataset, wrong, truth)
    )
    assert reused.report.overall["acc1"] == 0.0  # the given predictions, not the model's
    assert [r["predicted"] for r in rows(reused.folder / "predictions.csv")] == [
        CLASSES[i] for i in (truth + 1) % 3
    ]
    # one image left out of the test pass (unreadable): the rows no longer match the files
    partial = TestedSplit(dataset, wrong[:-1], truth[:-1])
    again = evaluate_run(trained, [], "test", name="partial", tested=partial)
    at_end = json.loads((trained / "eval" / "test" / "metrics.json").read_text())
    assert again.report.overall["acc1"] == pytest.approx(at_end["overall"]["acc1"])
    assert again.report.num_samples == 21


@pytest.mark.slow
def test_predict_agrees_with_evaluate_and_lists_unreadable_files(trained: Path) -> None:
    test_dir = trained.parents[1] / "data" / "test"
    broken = trained.parents[1] / "broken.png"
    broken.write_bytes(b"not an image")
    empty = trained.parents[1] / "empty.png"
    empty.write_bytes(b"")  # a zero-byte file (was a cv2.error traceback)
    out = trained.parents[1] / "preds.csv"
    result = run_cli(
        "predict", str(trained), str(test_dir), str(broken), str(empty), "--out", str(out),
        cwd=trained, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "21 images predicted, 2 unreadable" in result.stdout
    predicted = {r["path"]: r for r in rows(out)}
    assert "cannot decode image" in predicted[str(broken)]["error"]
    assert "the file is empty (0 bytes)" in predicted[str(empty)]["error"]
    evaluated = rows(trained / "eval" / "test" / "predictions.csv")
    for row in evaluated:  # the same image: the same class, the same probability
        mine = predicted[str(Path(row["path"]))]
        assert mine["predicted"] == row["predicted"] and mine["error"] == ""
        assert float(mine["probability"]) == pytest.approx(float(row["probability"]), abs=1e-5)


@pytest.mark.slow
def test_evaluate_on_other_data_aligns_classes_by_name(trained: Path, tmp_path: Path) -> None:
    # A folder with two of the three classes, in another order on disk: labels follow names.
    make_class_images(tmp_path / "new", {"c": 4, "a": 4}, seed=5)
    result = run_cli(
        "evaluate", str(trained), f"data.root={tmp_path / 'new'}", cwd=tmp_path, env=ONE_THREAD
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((trained / "eval" / "new" / "metrics.json").read_text())
    assert report["split"] == "all" and report["num_samples"] == 8
    assert report["overrides"] == [f"data.root={tmp_path / 'new'}"]  # recorded with the numbers
    supports = {r["name"]: r["support"] for r in report["per_class"]}
    assert supports == {"a": 4, "b": 0, "c": 4}
    make_class_images(tmp_path / "other", {"a": 2, "zebra": 2}, seed=6)
    unknown = run_cli(
        "evaluate", str(trained), f"data.root={tmp_path / 'other'}", cwd=tmp_path, env=ONE_THREAD
    )
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "zebra" in unknown.stderr and "never learned" in unknown.stderr


def test_evaluate_refuses_what_is_not_a_classification_run(tmp_path: Path) -> None:
    result = run_cli("evaluate", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a vittune run folder" in result.stderr
    assert result.stderr.count("\n") == 1
    (tmp_path / "recipe.yaml").write_text("task: pretrain-mae\ndata: {builtin: digits}\n")
    mae = run_cli("predict", str(tmp_path), str(tmp_path), cwd=tmp_path)
    assert mae.returncode == 2 and "MAE pretraining run" in mae.stderr


@pytest.mark.slow
def test_attention_maps_during_training_and_from_the_command(trained: Path) -> None:
    saved = sorted((trained / "attention").glob("epoch_*/image_*.png"))
    assert [p.parent.name for p in saved] == ["epoch_002"] * 4  # every 3rd epoch, 4 images
    test_dir = trained.parents[1] / "data" / "test"
    out = trained.parents[1] / "maps"
    broken = trained.parents[1] / "broken-attention.png"
    broken.write_bytes(b"\x89PNG\r\n")
    result = run_cli(
        "attention", str(trained), str(test_dir / "a"), str(test_dir / "b"), str(broken),
        "--out", str(out), "--head-fusion", "max", "--discard-ratio", "0.5",
        cwd=trained, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "14 image(s)" in result.stdout and "skipped" in result.stderr
    # both class folders hold files of the same names: one figure each, none overwritten
    pictures = sorted(out.glob("*_attention.png"))
    assert len(pictures) == 14 and {p.name.split("_")[0] for p in pictures} == {"a", "b"}
    assert plt_image_shape(pictures[0])[0] > 100  # a real figure, not an empty file


def plt_image_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    return matplotlib.image.imread(path).shape


@pytest.mark.slow
def test_evaluate_with_token_merging_reports_each_r_beside_r_zero(trained: Path) -> None:
    result = run_cli(
        "evaluate", str(trained), "--token-merge", "1", "--token-merge", "3", "--name", "tome",
        cwd=trained, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "token merging (ToMe)" in result.stdout
    report = json.loads((trained / "eval" / "tome" / "metrics.json").read_text())
    rows = report["token_merging"]
    assert [r["r"] for r in rows] == [0, 1, 3]
    assert [r["tokens_last_block"] for r in rows] == [16, 14, 10]  # 4x4 grid, 2 blocks
    assert rows[0]["acc1"] == pytest.approx(report["overall"]["acc1"])  # r = 0: the model
    assert all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["predict", "{run}", "{image}", "--batch-size", "-3"], "--batch-size must be at least 1"),
        (["predict", "{run}", "{image}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["predict", "{run}", "{image}", "--out", "{folder}"], "is a folder; give a file"),
        (["predict", "{run}", "{image}", "--device", "foo"], "--device must be auto, cpu, cuda"),
        # no GPU here: none visible; on a GPU machine: not that many
        (["predict", "{run}", "{image}", "--device", "cuda:99"], "--device cuda:99: "),
        (["evaluate", "{run}", "--device", "tpu"], "--device must be auto, cpu, cuda"),
        (["evaluate", "{run}", "--name", "../elsewhere"], "holds a path separator"),
        (["evaluate", "{run}", "model.img_size=64"], "data.* overrides only (the images"),
        (["evaluate", "{run}", "optim.lr=0.1"], "data.* overrides only (the images"),
    ],
)
def test_option_mistakes_of_predict_and_evaluate_are_one_line(
    trained: Path, tmp_path: Path, args: list[str], expected: str
) -> None:
    image = next((trained.parents[1] / "data" / "test" / "a").glob("*.png"))
    filled = [a.format(run=trained, image=image, folder=tmp_path) for a in args]
    result = run_in_process(*filled, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (trained / "elsewhere").exists() and not (trained.parent / "elsewhere").exists()
