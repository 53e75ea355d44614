"""The distillation teacher: any trained timm classifier, frozen, seeing the student's batch.

The teacher comes from timm hub weights, a weight file, or a vittune run folder (whose
`config.json` names its architecture, classes, geometry and normalisation). It is wrapped so
that the student's loss can call it on the student's normalised batch: the wrapper undoes the
student's normalisation, matches channels and resolution, applies the teacher's own
normalisation, and reorders the teacher's logits into the student's class order.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import timm.data
import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models import get_pretrained_cfg
from timm.task import DistillationTeacher
from torch import nn

from vittune.errors import RecipeError, WeightsError
from vittune.models.backbone import create_backbone
from vittune.models.normalisation import resolve_normalisation
from vittune.models.run_config import RunConfig
from vittune.models.weights import WeightSource, resolve_weight_file
from vittune.recipe.schema import ModelConfig, TeacherConfig


def align_classes(teacher_classes: list[str], student_classes: list[str]) -> list[int]:
    """For each student class, the index of the teacher logit with the same name.

    Class lists are matched by name, never by position: a teacher trained with another folder
    order still teaches the right class. Any name on one side only is an error.
    """
    if len(set(teacher_classes)) != len(teacher_classes):
        twice = sorted({c for c in teacher_classes if teacher_classes.count(c) > 1})
        raise RecipeError(
            f"teacher class names repeat ({twice}); give each teacher output a unique name"
        )
    missing = [c for c in student_classes if c not in teacher_classes]
    extra = [c for c in teacher_classes if c not in student_classes]
    if missing or extra:
        raise RecipeError(
            f"teacher and student classes differ: not in the teacher {missing[:8]}, only in the teacher {extra[:8]}; "
            "distil from a teacher trained on the same class names (their order may differ)"
        )
    return [teacher_classes.index(c) for c in student_classes]


class FrozenTeacher(DistillationTeacher):
    """A teacher that takes the student's normalised batch and answers in the student's classes.

    Built on timm's `DistillationTeacher` (it holds the model in eval mode with its own mean and
    std). Its `normalize_input` converts between normalisations in one expression, which leaves
    no room for a channel conversion or a resize in between, so `prepare` goes through pixel
    intensities explicitly. The teacher never trains: no gradients, no BatchNorm updates, and
    `train()` keeps it in eval mode when Lightning switches the parent task to training.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        img_size: int | tuple[int, int],
        class_index: list[int],
        description: str = "",
    ) -> None:
        super().__init__(model)
        self.model.requires_grad_(False)
        self.in_chans = len(mean)
        self.img_size = tuple(to_2tuple(img_size))
        self.description = description
        # The resolved statistics (recipe, run config.json) replace timm's pretrained_cfg ones.
        self.mean_kd = torch.tensor(mean, dtype=torch.float).view(1, -1, 1, 1)
        self.std_kd = torch.tensor(std, dtype=torch.float).view(1, -1, 1, 1)
        stats = {"student_mean": student_mean, "student_std": student_std}
        for name, values in stats.items():
            self.register_buffer(
                name, torch.tensor(values, dtype=torch.float).view(1, -1, 1, 1), persistent=False
            )
        self.register_buffer("class_index", torch.tensor(class_index), persistent=False)
        self.permuted = class_index != list(range(len(class_index)))
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever the parent asks (BatchNorm statistics, dropout)."""
        return super().train(False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised batch as the teacher expects it, in the batch's dtype.

        The arithmetic runs in float32: under a `*-true` precision the buffers are bf16/fp16,
        and un-normalising in those would lose precision before the teacher sees the pixels.
        """
        mean, std = self.student_mean.float(), self.student_std.float()
        pixels = images.float() * std + mean  # [B, Cs, H, W] intensities
        if pixels.shape[1] != self.in_chans:
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, self.in_chans, -1, -1)  # grey -> [B, Ct, H, W]
            else:
                pixels = pixels.mean(dim=1, keepdim=True)  # colour -> grey [B, 1, H, W]
        if tuple(pixels.shape[-2:]) != self.img_size:
            # The same resampling as the data pipeline's Resize (OpenCV INTER_LINEAR: bilinear,
            # half-pixel centres, no antialiasing), i.e. what the teacher saw in its fine-tune.
            pixels = F.interpolate(
                pixels, size=self.img_size, mode="bilinear", align_corners=False, antialias=False
            )  # [B, Ct, h, w]
        inputs = (pixels - self.mean_kd.float()) / self.std_kd.float()
        return inputs.to(images.dtype)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Teacher logits [B, K] in the student's class order (or pooled features)."""
        inputs = self.prepare(images)
        if return_features:
            return super().forward(inputs, return_features=True)
        logits = self.model(inputs)  # [B, K] in the teacher's class order
        return logits.index_select(1, self.class_index) if self.permuted else logits


def _pretrained_cfg(name: str) -> Any:
    """timm's pretrained config for the teacher's name (None when it has none)."""
    if not timm.is_model(name):
        guess = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise RecipeError(
            f"unknown timm model {name!r} in distill.teacher.name"
            + (f"; did you mean {guess[0]!r}?" if guess else "; see timm.list_models()")
        )
    try:
        return get_pretrained_cfg(name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise RecipeError(
            f"distill.teacher.name: {err} See timm.list_pretrained('{name.split('.')[0]}*')"
        ) from None


def _hub_classes(cfg: TeacherConfig, num_classes: int) -> list[str] | None:
    """Output names of hub weights: the recipe's, timm's label names, or ImageNet synsets."""
    if cfg.classes is not None:
        return list(cfg.classes)
    pretrained = _pretrained_cfg(cfg.name)
    if pretrained is not None and pretrained.label_names:
        return list(pretrained.label_names)
    subset = timm.data.infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None
    names = timm.data.ImageNetInfo(subset).label_names()
    return list(names) if len(names) == num_classes else None


def _from_hub(cfg: TeacherConfig, student_in_chans: int) -> tuple[ModelConfig, list[str], str]:
    pretrained = _pretrained_cfg(cfg.name)
    has_weights = pretrained is not None and (
        pretrained.url or pretrained.hf_hub_id or pretrained.file
    )
    if not has_weights:
        raise WeightsError(
            f"timm has no hub weights for teacher {cfg.name}; set distill.teacher.pretrained to a weight file or vittune run folder"
        )
    num_classes = int(pretrained.num_classes or 0)
    if num_classes == 0:
        raise WeightsError(
            f"hub weights {cfg.name} have no classifier head, so they cannot teach; pick a classifier (e.g. {cfg.name.split('.')[0]}.<tag>_in1k) or a fine-tuned run"
        )
    classes = _hub_classes(cfg, num_classes)
    if classes is None:
        raise RecipeError(
            f"the class names of {cfg.name}'s {num_classes} outputs are unknown; list them, in order, in distill.teacher.classes"
        )
    if len(classes) != num_classes:
        raise RecipeError(
            f"distill.teacher.classes lists {len(classes)} names but {cfg.name} has {num_classes} outputs; list every output in order"
        )
    model_cfg = ModelConfig(
        name=cfg.name,
        pretrained=True,
        img_size=cfg.img_size or tuple(pretrained.input_size[-2:]),
        in_chans=cfg.in_chans or student_in_chans,
        drop_rate=0.0,
        drop_path_rate=0.0,
        kwargs=cfg.kwargs,
    )
    return model_cfg, classes, f"timm hub ({pretrained.hf_hub_id or cfg.name})"


def _from_file(
    cfg: TeacherConfig, student_in_chans: int
) -> tuple[ModelConfig, list[str], RunConfig, WeightSource]:
    source = resolve_weight_file(str(cfg.pretrained))
    saved = source.config or RunConfig(source.path.parent / "config.json")
    arch = saved.architecture
    if arch and arch != cfg.name:
        raise RecipeError(
            f"distill.teacher.name is {cfg.name} but {source.path} holds {arch} weights; set distill.teacher.name: {arch}"
        )
    classes = saved.classes
    if cfg.classes is not None and classes and list(cfg.classes) != classes:
        raise RecipeError(
            f"distill.teacher.classes differs from the classes in {saved.path}; remove distill.teacher.classes (the run's own list is used)"
        )
    classes = list(cfg.classes or classes or [])
    if not classes:
        raise RecipeError(
            f"the teacher's classes are unknown ({source.path} has no config.json with classes); list them, in order, in distill.teacher.classes"
        )
    pretrained = _pretrained_cfg(cfg.name)
    default_size = tuple(pretrained.input_size[-2:]) if pretrained is not None else 224
    model_cfg = ModelConfig(
        name=cfg.name,
        pretrained=str(cfg.pretrained),
        pretrained_sha256=cfg.pretrained_sha256,
        img_size=cfg.img_size or saved.img_size or default_size,
        patch_size=saved.patch_size,
        in_chans=cfg.in_chans or saved.in_chans or student_in_chans,
        drop_rate=0.0,
        drop_path_rate=0.0,
        keep_head=True,
        kwargs=cfg.kwargs,
    )
    return model_cfg, classes, saved, source


def build_teacher(
    cfg: TeacherConfig,
    classes: list[str],
    student_in_chans: int,
    student_mean: tuple[float, ...],
    student_std: tuple[float, ...],
) -> FrozenTeacher:
    """Create the recipe's teacher with its trained head and wrap it for the student's batches.

    A head that does not load is an error: the head is what teaches. (A teacher without
    weights, `pretrained: false`, is refused with the recipe: recipe/checks.py.)
    """
    saved: RunConfig | None = None
    weights: WeightSource | None = None
    if cfg.pretrained is True:
        model_cfg, teacher_classes, source = _from_hub(cfg, student_in_chans)
    else:
        model_cfg, teacher_classes, saved, weights = _from_file(cfg, student_in_chans)
        source = str(weights.path)
        # 0 outputs (an MAE encoder) is left to the head check below: "no trained head"
        if saved.num_classes not in (None, 0, len(teacher_classes)):
            raise RecipeError(
                f"{source} has {saved.num_classes} outputs but {len(teacher_classes)} teacher classes are named; fix distill.teacher.classes"
            )
    index = align_classes(teacher_classes, classes)
    in_chans = model_cfg.in_chans
    if student_in_chans != in_chans and 1 not in (student_in_chans, in_chans):
        raise RecipeError(
            f"cannot feed a {student_in_chans}-channel student batch to a {in_chans}-channel teacher; set distill.teacher.in_chans to 1 or {student_in_chans}"
        )
    model, report = create_backbone(model_cfg, len(teacher_classes), source=weights)
    if report.reinitialised:
        raise WeightsError(
            f"{source} has no trained head for {len(teacher_classes)} classes ({', '.join(report.reinitialised)}); a teacher must be a trained classifier, e.g. a `vittune finetune` run"
        )
    mean, std = resolve_normalisation(
        model,
        cfg.mean or (saved.mean if saved else None),
        cfg.std or (saved.std if saved else None),
        in_chans,
        "distill.teacher",
    )
    size = model_cfg.img_size
    description = (
        f"{cfg.name} from {source}, {size[0]}x{size[1]} px, {in_chans} channel(s), "
        f"mean {tuple(round(m, 4) for m in mean)}, std {tuple(round(s, 4) for s in std)}, "
        f"{len(classes)} classes {'re-ordered by name' if index != sorted(index) else 'in order'}"
    )
    return FrozenTeacher(model, mean, std, student_mean, student_std, size, index, description)
