"""Evaluation metrics against scikit-learn on the same predictions, fed batch by batch as a
class-sorted validation loader feeds them; undefined AUROC; the weighted soft-target loss."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_VIT
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    roc_auc_score,
    top_k_accuracy_score,
)
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe
from vittune.tasks.classification import ClassificationTask
from vittune.tasks.losses import WeightedSoftTargetCrossEntropy
from vittune.tasks.metrics import classification_metrics


def sorted_predictions(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(probs [N, K], targets [N]) sorted by class; class 0 is always right at top-1 (so the
    first batches are one class, all correct), the rest better than chance."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(num_classes).repeat_interleave(per_class)  # [N] sorted
    logits = torch.randn(len(targets), num_classes, generator=generator)  # [N, K]
    logits[torch.arange(len(targets)), targets] += 1.0
    logits[targets == 0, 0] += 10.0
    return logits.softmax(dim=-1), targets


def feed(metrics: MetricCollection, probs: torch.Tensor, targets: torch.Tensor, batch: int) -> dict:
    for start in range(0, len(targets), batch):
        metrics.update(probs[start : start + batch], targets[start : start + batch])
    return {k: float(v) for k, v in metrics.compute().items()}


def sklearn_multiclass(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    y, p = targets.numpy(), probs.numpy()
    labels = np.arange(p.shape[1])
    return {
        "acc1": accuracy_score(y, p.argmax(1)),
        "acc5": top_k_accuracy_score(y, p, k=5, labels=labels),
        "f1": f1_score(y, p.argmax(1), average="macro"),
        "auroc": roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels),
    }


@pytest.mark.parametrize("batch", [8, 13, 1000])
def test_metrics_match_sklearn_with_a_one_class_first_batch(batch: int) -> None:
    probs, targets = sorted_predictions(num_classes=8, per_class=20, seed=batch)
    values = feed(classification_metrics(8, multi_label=False), probs, targets, batch)
    expected = sklearn_multiclass(probs, targets)
    assert values.keys() == expected.keys()
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-6), name


def test_torchmetrics_compute_groups_would_have_merged_f1_into_top5() -> None:
    """The scenario above is the one that broke `val/f1`: with torchmetrics' default compute
    groups, top-5 accuracy and macro F1 share one state after a one-class, all-correct first
    batch, and F1 is then computed from top-5 hits."""
    probs, targets = sorted_predictions(num_classes=8, per_class=20, seed=0)
    ours = classification_metrics(8, multi_label=False)
    grouped = MetricCollection({k: m.clone() for k, m in ours.items()})  # compute_groups=True
    values = feed(grouped, probs, targets, batch=8)
    assert ["acc5", "f1"] in grouped.compute_groups.values()
    assert values["f1"] != pytest.approx(sklearn_multiclass(probs, targets)["f1"], abs=1e-3)
    assert feed(ours, probs, targets, batch=8)["f1"] == pytest.approx(
        sklearn_multiclass(probs, targets)["f1"], abs=1e-6
    )


def test_macro_f1_leaves_out_classes_absent_from_targets_and_predictions_as_sklearn() -> None:
    targets = torch.tensor([0, 0, 1, 1, 1, 0])
    predicted = torch.tensor([0, 2, 1, 1, 0, 0])  # 2: predicted, never true; 3: neither
    probs = F.one_hot(predicted, 4).float() * 0.7 + 0.075
    values = feed(classification_metrics(4, multi_label=False), probs, targets, batch=6)
    expected = f1_score(targets.numpy(), predicted.numpy(), average="macro")  # labels 0, 1, 2
    assert values["f1"] == pytest.approx(expected, abs=1e-6)
    assert values["f1"] != pytest.approx(
        f1_score(targets.numpy(), predicted.numpy(), average="macro", labels=range(4)), abs=1e-3
    )


def test_auroc_is_nan_when_a_class_has_no_target_as_in_sklearn() -> None:
    probs, targets = sorted_predictions(num_classes=3, per_class=10, seed=1)
    keep = targets != 2  # class 2 absent from the targets, still predicted sometimes
    metrics = classification_metrics(3, multi_label=False)
    values = feed(metrics, probs[keep], targets[keep], batch=4)
    assert np.isnan(values["auroc"])
    assert metrics["auroc"].undefined == [2]
    with pytest.warns(UndefinedMetricWarning, match="not defined"):  # scikit-learn: NaN too
        reference = roc_auc_score(
            targets[keep].numpy(), probs[keep].numpy(), multi_class="ovr", labels=[0, 1, 2]
        )
    assert np.isnan(reference)
    # the other metrics stay defined and equal to scikit-learn's
    y, p = targets[keep].numpy(), probs[keep].numpy()
    assert values["acc1"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-6)
    assert values["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"), abs=1e-6)


def multilabel_predictions(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(60, 4, generator=generator) < 0.4).long()  # [N, L]
    targets = targets[targets[:, 0].argsort(descending=True, stable=True)]  # sorted by label 0
    logits = torch.randn(60, 4, generator=generator) + 1.5 * (2 * targets - 1)
    return logits.sigmoid(), targets


def test_multilabel_metrics_match_sklearn() -> None:
    probs, targets = multilabel_predictions(seed=2)
    targets[:, 3] = 0
    targets[::7, 3] = 1  # a rare label
    values = feed(classification_metrics(4, multi_label=True), probs, targets, batch=16)
    y, decided = targets.numpy(), (probs > 0.5).long().numpy()
    assert values["acc1"] == pytest.approx(1 - hamming_loss(y, decided), abs=1e-6)
    assert values["f1"] == pytest.approx(
        f1_score(y, decided, average="macro", zero_division=0), abs=1e-6
    )
    assert values["auroc"] == pytest.approx(
        roc_auc_score(y, probs.numpy(), average="macro"), abs=1e-6
    )


def test_multilabel_auroc_is_nan_for_a_label_without_positives_or_negatives() -> None:
    probs, targets = multilabel_predictions(seed=3)
    targets[:, 1], targets[:, 2] = 0, 1  # label 1 never present, label 2 always
    metrics = classification_metrics(4, multi_label=True)
    values = feed(metrics, probs, targets, batch=16)
    assert np.isnan(values["auroc"]) and metrics["auroc"].undefined == [1, 2]
    with pytest.warns(UndefinedMetricWarning, match="not defined"):
        assert np.isnan(roc_auc_score(targets.numpy(), probs.numpy(), average="macro"))
    decided = (probs > 0.5).long().numpy()  # F1 stays defined: label 1 counts 0, as in sklearn
    assert values["f1"] == pytest.approx(
        f1_score(targets.numpy(), decided, average="macro", zero_division=0), abs=1e-6
    )


def tiny_task(
    num_classes: int,
    class_weights: list[float] | None = None,
    multi_label: bool = False,
    **recipe: dict,
) -> ClassificationTask:
    torch.manual_seed(0)
    model = timm.create_model(
        TINY_VIT["name"], num_classes=num_classes, in_chans=1, img_size=32, patch_size=8,
        **TINY_VIT["kwargs"],
    )  # fmt: skip
    data = {"builtin": "digits", "multi_label": multi_label}
    config = Recipe.model_validate({"data": data, **recipe})
    classes = [f"c{i}" for i in range(num_classes)]
    weights = None if class_weights is None else torch.tensor(class_weights)
    return ClassificationTask(config, model, classes, weights)


def validate(task: ClassificationTask, images: torch.Tensor, targets: torch.Tensor) -> dict:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = DataLoader(TensorDataset(images, targets), batch_size=5)  # last batch: 3 images
    return {k: float(v) for k, v in trainer.validate(task, loader, verbose=False)[0].items()}


def test_a_lightning_validation_logs_sklearn_numbers_every_epoch() -> None:
    """Through Lightning's logging: per-image mean loss (not a mean of batch means), metrics
    reset between epochs (a second validation on other weights logs that model's numbers)."""
    task = tiny_task(6)
    images = torch.randn(23, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(23) * 6 // 23  # sorted by class
    for _ in range(2):
        logged = validate(task, images, targets)
        with torch.no_grad():
            logits = task.eval()(images)  # [N, K]
        expected = sklearn_multiclass(logits.softmax(-1), targets)
        expected["loss"] = F.cross_entropy(logits, targets).item()
        for name, value in expected.items():
            assert logged[f"val/{name}"] == pytest.approx(value, abs=1e-5), name
        with torch.no_grad():  # other weights for the second epoch
            task.model.head.weight.add_(torch.randn_like(task.model.head.weight))


def test_a_lightning_validation_logs_sklearn_numbers_for_multi_label() -> None:
    task = tiny_task(4, multi_label=True)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(23, 1, 32, 32, generator=generator)
    targets = (torch.rand(23, 4, generator=generator) < 0.5).float()  # [N, L]
    targets = targets[targets[:, 0].argsort(descending=True, stable=True)]
    logged = validate(task, images, targets)
    with torch.no_grad():
        logits = task.eval()(images)  # [N, L]
    y, probs = targets.long().numpy(), logits.sigmoid().numpy()
    expected = {
        "acc1": 1 - hamming_loss(y, probs > 0.5),
        "f1": f1_score(y, probs > 0.5, average="macro", zero_division=0),
        "auroc": roc_auc_score(y, probs, average="macro"),
        "loss": F.binary_cross_entropy_with_logits(logits, targets).item(),
    }
    assert set(logged) == {f"val/{name}" for name in expected}
    for name, value in expected.items():
        assert logged[f"val/{name}"] == pytest.approx(value, abs=1e-5), name


def test_an_undefined_metric_logs_nan_with_one_note_and_may_not_be_monitored() -> None:
    task = tiny_task(3)
    images = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(8, dtype=torch.long)  # a one-class validation set
    with pytest.warns(UserWarning, match=r"val/auroc is NaN: classes \['c1', 'c2'\] have no val"):
        logged = validate(task, images, targets)
    assert np.isnan(logged["val/auroc"]) and logged["val/acc1"] >= 0  # never a silent 0.0
    assert task.val_metrics.noted == {"val/auroc"}  # the note is printed once per run
    monitored = tiny_task(3, checkpoint={"monitor": "val/auroc"})
    with pytest.raises(RecipeError, match=r"checkpoint.monitor val/auroc is NaN: classes"):
        validate(monitored, images, targets)


def test_weighted_soft_target_loss_is_torch_weighted_cross_entropy_on_one_hot_targets() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 4, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 1, 1, 0, 3, 3])
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    weighted = WeightedSoftTargetCrossEntropy(weights)
    one_hot = F.one_hot(targets, 4).float()
    torch.testing.assert_close(
        weighted(logits, one_hot), torch.nn.CrossEntropyLoss(weight=weights)(logits, targets)
    )
    soft = torch.softmax(torch.randn(9, 4, generator=generator), dim=-1)  # any soft targets
    torch.testing.assert_close(
        WeightedSoftTargetCrossEntropy(torch.ones(4))(logits, soft),
        SoftTargetCrossEntropy()(logits, soft),
    )
    # a mix lam : 1 - lam of images of classes a and b counts as lam of one, 1 - lam of the other
    lam, a, b = 0.3, targets, targets.flip(0)
    mixed = lam * one_hot + (1 - lam) * one_hot.flip(0)
    logp = logits.log_softmax(-1)
    numerator = -(lam * weights[a] * logp[range(9), a] + (1 - lam) * weights[b] * logp[range(9), b])
    denominator = lam * weights[a] + (1 - lam) * weights[b]
    torch.testing.assert_close(weighted(logits, mixed), numerator.sum() / denominator.sum())


def test_class_weights_are_kept_with_mixup() -> None:
    weights = [1.0, 4.0, 0.5]
    task = tiny_task(3, weights, augment={"mixup_alpha": 0.8}, loss={"class_weights": weights})
    assert isinstance(task.mixup, Mixup)
    torch.testing.assert_close(task.train_loss.weight, torch.tensor(weights))
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    soft = task.mixup(torch.zeros(4, 1, 32, 32), targets)[1]  # [B, K] mixed targets
    expected = -(soft * torch.tensor(weights) * logits.log_softmax(-1)).sum()
    torch.testing.assert_close(
        task.train_loss(logits, soft), expected / (soft * torch.tensor(weights)).sum()
    )
