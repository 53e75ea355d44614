"""What classification and distillation log at evaluation: metrics, mean loss, undefined values.

Every number here is a torchmetrics state that is summed or concatenated across processes, so a
DDP run logs what one process seeing every validation image once would log (the datamodule's
unpadded validation sampler makes "once" true). The reference for each value is scikit-learn on
the same predictions (tests/tasks/test_metrics.py):

    acc1   accuracy_score                  multi-label: 1 - hamming_loss (per-label decisions)
    acc5   top_k_accuracy_score(k=5)       only above 5 classes
    f1     f1_score(average="macro")       classes absent from targets and predictions are
                                           left out (multi-class) or count 0 (multi-label),
                                           as scikit-learn's defaults do
    auroc  roc_auc_score(macro, "ovr")     NaN where it is undefined, as scikit-learn's
                                           (see `UndefinedAsNaN`)
    loss   mean over images                of per-image losses, not a mean of batch means
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)
from torchmetrics.utilities import dim_zero_cat

from vittune.errors import RecipeError


class UndefinedAsNaN:
    """Mixin for torchmetrics' macro AUROCs: NaN, not 0, when a class lacks positives or negatives.

    torchmetrics scores such a class 0 and averages it in (a one-class validation set logged
    AUROC 0.0); scikit-learn answers NaN with an UndefinedMetricWarning. So do we, and record
    the classes at fault in `undefined` for the note `EvaluationMetrics` prints. Inside
    `compute` the states are already gathered from every process.
    """

    undefined: list[int]

    def compute(self) -> torch.Tensor:
        target = dim_zero_cat(self.target)  # [N] class ids, or [N, L] 0/1 per label
        if target.ndim == 1:  # one-vs-rest: a class lacks negatives only if the others are absent
            undefined = torch.bincount(target.long(), minlength=self.num_classes) == 0  # [K]
        else:
            positives = (target == 1).sum(dim=0)  # [L]
            undefined = (positives == 0) | (positives == len(target))
        self.undefined = torch.nonzero(undefined).flatten().tolist()
        if self.undefined:
            return torch.tensor(float("nan"), device=target.device)
        return super().compute()


class MulticlassMacroAUROC(UndefinedAsNaN, MulticlassAUROC):
    """One-vs-rest macro AUROC; NaN unless every class occurs in the targets."""


class MultilabelMacroAUROC(UndefinedAsNaN, MultilabelAUROC):
    """Macro AUROC over labels; NaN unless every label has positive and negative targets."""


def classification_metrics(num_classes: int, multi_label: bool) -> MetricCollection:
    """top-1 (and top-5 above 5 classes), macro F1 and macro AUROC, on probabilities [B, K].

    Compute groups are off: torchmetrics merges metrics whose states are equal after the first
    update and from then on computes all of them from one state. Top-5 accuracy and macro F1
    keep the same per-class counts, and after a first batch whose every image is right at
    top-1 (easy when the loader is sorted by class) they are equal, so `val/f1` reported a
    function of the top-5 hits.
    """
    if multi_label:
        metrics: dict[str, Metric] = {
            "acc1": MultilabelAccuracy(num_labels=num_classes),
            "f1": MultilabelF1Score(num_labels=num_classes, average="macro"),
            "auroc": MultilabelMacroAUROC(num_labels=num_classes, average="macro"),
        }
    else:
        metrics = {
            "acc1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
            "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
            "auroc": MulticlassMacroAUROC(num_classes=num_classes, average="macro"),
        }
        if num_classes > 5:
            metrics["acc5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, compute_groups=False)


class EvaluationMetrics(nn.Module):
    """One evaluation stage (`val` or `test`): prediction metrics, mean loss and extra metrics.

    The task updates it every step and calls `log` once per epoch. Lightning receives the
    Metric objects themselves, so it computes them across processes and resets them after the
    epoch; logging `compute()`'s tensors instead would need `sync_dist` on numbers that are
    already global.
    """

    def __init__(
        self,
        metrics: MetricCollection,
        stage: str,
        classes: list[str],
        extra: dict[str, Metric] | None = None,
    ) -> None:
        super().__init__()
        self.stage = stage
        self.classes = list(classes)
        self.metrics = metrics.clone(prefix=f"{stage}/")
        # The mean of per-image losses. "disable": a diverged model logs NaN rather than the mean
        # of its finite losses. (With "disable", torchmetrics 1.9 ignores `weight=`, issue
        # Lightning-AI/torchmetrics#3434: hence per-image values, not batch means and sizes.)
        self.loss = MeanMetric(nan_strategy="disable")
        self.extra = None  # metrics the task updates itself (distillation's per-head top-1)
        if extra:  # cloned, so that one dict can serve the val and the test stage
            extra_metrics = MetricCollection(extra, compute_groups=False)
            self.extra = extra_metrics.clone(prefix=f"{stage}/")
        self.noted: set[str] = set()

    def update(self, probs: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> None:
        """probs [B, K]; targets [B] class ids or [B, K] 0/1; losses [B] (or [B, K]) unreduced."""
        self.metrics.update(probs, targets.long() if targets.ndim == 2 else targets)
        self.loss.update(losses.detach().float())

    def log(self, module: L.LightningModule, monitor: str | None = None) -> None:
        """Hand this epoch's metrics to Lightning, with a one-time note for each undefined one.

        An undefined `monitor` is an error: Lightning's ModelCheckpoint ranks NaN below every
        number, so it would keep the first epoch's weights as "best" for the whole run.
        """
        for name, value in self.metrics.compute().items():  # cached: Lightning reuses it
            if not torch.isnan(value):
                continue
            if name == monitor:
                raise RecipeError(
                    f"checkpoint.monitor {name} is NaN: {self.why_undefined(name)}; "
                    f"monitor {self.stage}/acc1 or {self.stage}/loss instead"
                )
            if name not in self.noted:
                self.noted.add(name)
                rank_zero_warn(f"{name} is NaN: {self.why_undefined(name)}")
        module.log(f"{self.stage}/loss", self.loss, prog_bar=True)
        module.log_dict(self.metrics, prog_bar=True)
        if self.extra is not None:
            module.log_dict(self.extra)

    def why_undefined(self, name: str) -> str:
        metric = self.metrics[name]  # the collection strips its prefix
        missing = [self.classes[i] for i in getattr(metric, "undefined", [])]
        if not missing:
            return "the predictions are not finite"
        if isinstance(metric, MultilabelAUROC):
            return (
                f"labels {missing} have only positive or only negative {self.stage} targets, "
                "so their ROC curve, and the macro AUROC, is undefined"
            )
        return (
            f"classes {missing} have no {self.stage} image, "
            "so their one-vs-rest ROC curve, and the macro AUROC, is undefined"
        )
