"""Classification losses and metrics against scikit-learn and the written-out formulas."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_VIT
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, top_k_accuracy_score
from sklearn.utils.class_weight import compute_class_weight

from vittune.recipe.schema import Recipe
from vittune.tasks.classification import ClassificationTask
from vittune.tasks.losses import balanced_class_weights
from vittune.tasks.metrics import classification_metrics


def test_balanced_class_weights_match_scikit_learn() -> None:
    labels = np.array([0] * 50 + [1] * 7 + [2] * 3)
    counts = torch.tensor(np.bincount(labels), dtype=torch.float)
    reference = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    np.testing.assert_allclose(balanced_class_weights(counts).numpy(), reference, rtol=1e-6)


def test_weighted_smoothed_loss_matches_the_formula() -> None:
    recipe = Recipe.model_validate(
        {"data": {"builtin": "digits"}, "loss": {"label_smoothing": 0.1}}
    )
    model = timm.create_model(
        TINY_VIT["name"], num_classes=4, img_size=32, patch_size=8, **TINY_VIT["kwargs"]
    )
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    task = ClassificationTask(recipe, model, ["a", "b", "c", "d"], weights)
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 1, 1])
    # Smoothing spreads eps over all K classes, each term weighted by its class weight;
    # the mean divides by the summed weights of the true classes.
    logp = logits.log_softmax(dim=-1)
    eps, k = 0.1, 4
    true_term = -(logp[torch.arange(6), targets] * weights[targets]).sum()
    smooth_term = -(logp * weights).sum()
    expected = ((1 - eps) * true_term + eps / k * smooth_term) / weights[targets].sum()
    torch.testing.assert_close(task.train_loss(logits, targets), expected)
    # evaluation loss stays plain cross-entropy: comparable across recipes
    torch.testing.assert_close(
        task.eval_loss(logits, targets),
        torch.nn.functional.cross_entropy(logits, targets, reduction="none"),
    )


@pytest.mark.parametrize("num_classes", [3, 8])
def test_metrics_match_scikit_learn(num_classes: int) -> None:
    generator = torch.Generator().manual_seed(num_classes)
    targets = torch.arange(200) % num_classes
    logits = torch.randn(200, num_classes, generator=generator)
    logits[torch.arange(200), targets] += 1.0  # better than chance, not perfect
    probs = logits.softmax(dim=-1)
    metrics = classification_metrics(num_classes, multi_label=False)
    values = {k: float(v) for k, v in metrics(probs, targets).items()}
    assert ("acc5" in values) == (num_classes > 5)  # top-5 only above 5 classes
    y, p = targets.numpy(), probs.numpy()
    assert values["acc1"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-6)
    assert values["f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"), abs=1e-5)
    assert values["auroc"] == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-4
    )
    if num_classes > 5:
        assert values["acc5"] == pytest.approx(top_k_accuracy_score(y, p, k=5), abs=1e-6)
