"""DeiT distillation against references: the paper's loss formulas written out here, timm's own
`TokenDistillationTask` on the same models, a frozen teacher through a real Lightning fit,
inference that averages the two heads, and the teacher's class alignment and weight checks."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.task import TokenDistillationTask
from torch.utils.data import DataLoader, TensorDataset

from vittune.deploy.timm_folder import export_config, write_export
from vittune.errors import RecipeError, WeightsError
from vittune.models.heads import split_heads
from vittune.models.teacher import FrozenTeacher, align_classes, build_teacher
from vittune.recipe.schema import Recipe, TeacherConfig
from vittune.tasks.distillation import DistillationTask
from vittune.tasks.losses import deit_loss, distillation_term

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
CLASSES = ["cat", "dog", "eel"]
GREY_MEAN, GREY_STD = (0.5,), (0.25,)

warnings.filterwarnings("ignore", message=".*self.log.*")  # steps called without a Trainer


def tiny_deit(num_classes: int = 3, in_chans: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", num_classes=num_classes, in_chans=in_chans, **TINY
    )


def tiny_cnn(num_classes: int = 3, in_chans: int = 1, seed: int = 1) -> torch.nn.Module:
    """timm's 0.37M-parameter ResNet (with BatchNorm, whose statistics must never move)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=num_classes, in_chans=in_chans)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval vs train differ
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def save_teacher(
    folder: Path,
    model: torch.nn.Module,
    classes: list[str],
    img_size: int = 32,
    mean: tuple[float, ...] = GREY_MEAN,
    std: tuple[float, ...] = GREY_STD,
) -> Path:
    """A vittune-style export (model.safetensors + config.json), as `vittune finetune` writes."""
    in_chans = len(mean)
    config = export_config(model, classes, img_size, in_chans, mean, std, "finetune")
    write_export(model.state_dict(), config, folder)
    return folder


def recipe(kind: str = "hard", alpha: float = 0.5, tau: float = 1.0, **data) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"name": "deit_tiny_distilled_patch16_224", "in_chans": 1},
            "data": {"builtin": "digits", **data},
            "distill": {
                "teacher": {"name": "test_resnet", "pretrained": "unused"},
                "type": kind,
                "alpha": alpha,
                "tau": tau,
            },
        }
    )


def frozen(model: torch.nn.Module, index: list[int] | None = None, **kwargs) -> FrozenTeacher:
    index = index if index is not None else list(range(len(CLASSES)))
    args = dict(
        mean=GREY_MEAN, std=GREY_STD, student_mean=GREY_MEAN, student_std=GREY_STD, img_size=32
    )
    return FrozenTeacher(model, class_index=index, **{**args, **kwargs})


def batch(n: int = 8, channels: int = 1, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, channels, size, size, generator=generator)
    targets = torch.randint(0, len(CLASSES), (n,), generator=generator)
    return images, targets


# --- the loss: the paper's formulas, written out independently ----------------------------


def reference_hard(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean_i [ logsumexp(z_s,i) - z_s,i[argmax z_t,i] ]: CE against the teacher's decision."""
    y_t = teacher.argmax(dim=1)
    picked = student[torch.arange(len(student)), y_t]
    return (torch.logsumexp(student, dim=1) - picked).mean()


def reference_soft(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean_i sum_c p_t log(p_t / p_s), p = softmax(z / tau) (DeiT eq. 1)."""
    p_t = torch.exp(teacher / tau) / torch.exp(teacher / tau).sum(dim=1, keepdim=True)
    p_s = torch.exp(student / tau) / torch.exp(student / tau).sum(dim=1, keepdim=True)
    return tau**2 * (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean()


def test_hard_term_is_cross_entropy_with_teacher_argmax():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10) * 3
    got = distillation_term(student, teacher, "hard")
    assert torch.allclose(got, reference_hard(student, teacher), atol=1e-6)
    assert not torch.allclose(got, F.cross_entropy(student, torch.zeros(16, dtype=torch.long)))


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_term_is_tau_squared_kl(tau):
    torch.manual_seed(1)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10) * 2
    got = distillation_term(student, teacher, "soft", tau)
    assert torch.allclose(got, reference_soft(student, teacher, tau), atol=1e-5)
    assert distillation_term(teacher, teacher, "soft", tau).abs() < 1e-6  # KL(p || p) = 0


def test_alpha_weights_label_and_teacher_terms():
    base, term = torch.tensor(2.0), torch.tensor(6.0)
    assert deit_loss(base, term, 0.25).item() == pytest.approx(0.75 * 2.0 + 0.25 * 6.0)
    assert deit_loss(base, None, 0.25).item() == 2.0


def expected_step_loss(task: DistillationTask, teacher_model, images, targets, kind, alpha, tau):
    """The DeiT objective from the models' raw outputs, no vittune code involved."""
    student = task.model
    student.train()
    cls_logits, dist_logits = student(images)  # timm's distilled training forward
    teacher_model.eval()
    with torch.no_grad():
        teacher_logits = teacher_model(images)  # same normalisation and size here
    base = F.cross_entropy(cls_logits, targets)
    term = (
        reference_hard(dist_logits, teacher_logits)
        if kind == "hard"
        else reference_soft(dist_logits, teacher_logits, tau)
    )
    return (1 - alpha) * base + alpha * term


@pytest.mark.parametrize("kind, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.3, 2.0)])
def test_training_step_equals_deit_objective(kind, alpha, tau):
    teacher_model = tiny_cnn()
    task = DistillationTask(
        recipe(kind, alpha, tau), tiny_deit(), frozen(copy.deepcopy(teacher_model)), CLASSES
    )
    task.train()
    images, targets = batch()
    got = task.training_step((images, targets), 0)
    want = expected_step_loss(task, teacher_model, images, targets, kind, alpha, tau)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.3, 2.0)])
def test_training_step_equals_timm_token_distillation(kind, alpha, tau):
    """timm's own TokenDistillationTask on the same student and teacher gives the same loss.

    The student is normalised with ImageNet statistics and test_resnet's own are 0.5 / 0.5, so
    both tasks also re-normalise the batch for the teacher (timm from the pretrained configs).
    """
    student, teacher_model = tiny_deit(in_chans=3), tiny_cnn(in_chans=3)
    ours = DistillationTask(
        recipe(kind, alpha, tau),
        student,
        frozen(
            copy.deepcopy(teacher_model),
            mean=teacher_model.pretrained_cfg["mean"],
            std=teacher_model.pretrained_cfg["std"],
            student_mean=IMAGENET_DEFAULT_MEAN,
            student_std=IMAGENET_DEFAULT_STD,
        ),
        CLASSES,
    )
    theirs = TokenDistillationTask(
        student,
        teacher_model,
        criterion=torch.nn.CrossEntropyLoss(),
        distill_type=kind,
        task_loss_weight=1 - alpha,
        temperature=tau,
        verbose=False,
    )
    ours.train()
    theirs.train()
    images, targets = batch(channels=3)
    want = theirs(images, targets)["loss"]
    assert torch.allclose(ours.training_step((images, targets), 0), want, atol=1e-5)


def test_single_head_student_takes_both_terms_on_its_head():
    torch.manual_seed(0)
    student = timm.create_model("vit_tiny_patch16_224", num_classes=3, in_chans=1, **TINY)
    teacher_model = tiny_cnn()
    task = DistillationTask(recipe("hard"), student, frozen(copy.deepcopy(teacher_model)), CLASSES)
    task.train()
    images, targets = batch()
    got = task.training_step((images, targets), 0)
    logits = student(images)
    with torch.no_grad():
        teacher_logits = teacher_model.eval()(images)
    want = 0.5 * F.cross_entropy(logits, targets) + 0.5 * reference_hard(logits, teacher_logits)
    assert torch.allclose(got, want, atol=1e-5)


def test_no_distillation_trains_both_heads_on_labels():
    task = DistillationTask(recipe("none"), tiny_deit(), frozen(tiny_cnn()), CLASSES)
    task.train()
    images, targets = batch()
    got = task.training_step((images, targets), 0)
    cls_logits, dist_logits = task.model(images)
    want = 0.5 * F.cross_entropy(cls_logits, targets) + 0.5 * F.cross_entropy(dist_logits, targets)
    assert torch.allclose(got, want, atol=1e-5)


# --- the teacher never learns --------------------------------------------------------------


class Recorder(L.Callback):
    """Looks at the teacher where Lightning has just put the task in training mode."""

    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool]] = []
        self.teacher_grads: list[bool] = []

    def on_train_batch_start(self, trainer, task, batch, batch_idx) -> None:
        self.modes.append((task.training, task.teacher.training))

    def on_after_backward(self, trainer, task) -> None:
        self.teacher_grads.append(any(p.grad is not None for p in task.teacher.parameters()))


def test_teacher_is_frozen_through_a_lightning_fit(tmp_path):
    teacher = frozen(tiny_cnn())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in tiny_deit().state_dict().items()}
    task = DistillationTask(recipe("soft", tau=2.0), tiny_deit(), teacher, CLASSES)
    images, targets = batch(n=16)
    loader = DataLoader(TensorDataset(images, targets), batch_size=8)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(task, loader)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher.parameters())
    assert recorder.modes and all(mode == (True, False) for mode in recorder.modes)
    assert recorder.teacher_grads == [False] * 4
    assert all(not p.requires_grad for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, before[key]), key
    moved = [k for k, v in task.model.state_dict().items() if not torch.equal(v, student_before[k])]
    assert moved, "the student should have learned"

    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    fresh = DistillationTask(
        recipe("soft", tau=2.0), tiny_deit(seed=5), frozen(tiny_cnn()), CLASSES
    )
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: every key accounted for
    for key, value in task.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)


# --- inference averages the two heads ------------------------------------------------------


def test_inference_averages_the_two_heads():
    task = DistillationTask(recipe("hard"), tiny_deit(), frozen(tiny_cnn()), CLASSES)
    task.eval()
    images, _ = batch()
    student = task.model
    with torch.no_grad():
        tokens = student.forward_features(images)  # [B, 2 + N, D]
        cls_logits = student.head(tokens[:, 0])
        dist_logits = student.head_dist(tokens[:, 1])
        got = task(images)
        heads = split_heads(student, images)
        exported = student(images)  # what the exported timm model predicts
    assert not torch.allclose(cls_logits, dist_logits, atol=1e-3)
    assert torch.allclose(heads[0], cls_logits) and torch.allclose(heads[1], dist_logits)
    assert torch.allclose(got, (cls_logits + dist_logits) / 2, atol=1e-6)
    assert torch.allclose(exported, got, atol=1e-6)
    probs = task.predict_step((images,), 0)
    assert torch.allclose(probs, got.softmax(dim=-1), atol=1e-6)


def test_validation_logs_sklearn_numbers_for_the_prediction_each_head_and_the_teacher():
    """Each per-head top-1 is its own metric: with torchmetrics' default compute groups two
    heads that agree on the first batch would share one state from then on."""
    task = DistillationTask(recipe("soft"), tiny_deit(), frozen(tiny_cnn()), CLASSES)
    images, _ = batch(n=21, seed=3)
    targets = torch.arange(21) * 3 // 21  # sorted by class, as vittune's loaders are
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = DataLoader(TensorDataset(images, targets), batch_size=4)
    logged = trainer.validate(task, loader, verbose=False)[0]
    task.eval()
    with torch.no_grad():
        cls_logits, dist_logits = split_heads(task.model, images)
        logits = (cls_logits + dist_logits) / 2  # [N, K] the prediction
        teacher_logits = task.teacher(images)
    y, probs = targets.numpy(), logits.softmax(-1).numpy()
    expected = {
        "val/acc1": accuracy_score(y, probs.argmax(1)),
        "val/f1": f1_score(y, probs.argmax(1), average="macro"),
        "val/auroc": roc_auc_score(y, probs, multi_class="ovr"),
        "val/loss": F.cross_entropy(logits, targets).item(),
        "val/acc1_cls": accuracy_score(y, cls_logits.argmax(1).numpy()),
        "val/acc1_dist": accuracy_score(y, dist_logits.argmax(1).numpy()),
        "val/acc1_teacher": accuracy_score(y, teacher_logits.argmax(1).numpy()),
    }
    assert set(logged) == set(expected)
    for name, value in expected.items():
        assert float(logged[name]) == pytest.approx(value, abs=1e-5), name


# --- the teacher: class alignment, input conversion, weights -------------------------------


def test_align_classes_by_name():
    assert align_classes(["cat", "dog", "eel"], ["eel", "cat", "dog"]) == [2, 0, 1]
    with pytest.raises(RecipeError) as err:
        align_classes(["cat", "dog", "fox"], ["cat", "dog", "eel"])
    message = str(err.value)
    assert "'eel'" in message and "'fox'" in message and "\n" not in message


def test_teacher_logits_follow_the_student_class_order(tmp_path):
    model = tiny_cnn()
    folder = save_teacher(tmp_path / "teacher", model, CLASSES)
    shuffled = ["eel", "cat", "dog"]
    cfg = TeacherConfig(name="test_resnet", pretrained=str(folder))
    teacher = build_teacher(cfg, shuffled, 1, GREY_MEAN, GREY_STD)
    images, _ = batch()
    with torch.no_grad():
        raw = model.eval()(images)  # [B, 3] in cat, dog, eel order
    got = teacher(images)
    assert torch.allclose(got[:, 0], raw[:, 2], atol=1e-5)  # eel
    assert torch.allclose(got[:, 1], raw[:, 0], atol=1e-5)  # cat
    assert torch.allclose(got[:, 2], raw[:, 1], atol=1e-5)  # dog
    assert "re-ordered" in teacher.description

    with pytest.raises(RecipeError, match="only in the teacher"):
        build_teacher(cfg, ["cat", "dog"], 1, GREY_MEAN, GREY_STD)


@pytest.mark.parametrize("teacher_size", [48, 24])
def test_teacher_sees_its_own_normalisation_size_and_channels(teacher_size):
    """A grey 32 px student batch reaches an RGB teacher as RGB pixels in its own statistics,
    resized as the data pipeline resizes (OpenCV's bilinear, the reference here)."""
    teacher = FrozenTeacher(
        tiny_cnn(in_chans=3),
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        student_mean=GREY_MEAN,
        student_std=GREY_STD,
        img_size=teacher_size,
        class_index=[0, 1, 2],
    )
    pixels = torch.rand(4, 1, 32, 32)
    student_batch = (pixels - 0.5) / 0.25
    size = (teacher_size, teacher_size)
    resized = [cv2.resize(p[0].numpy(), size, interpolation=cv2.INTER_LINEAR) for p in pixels]
    rgb = torch.from_numpy(np.stack(resized))[:, None].repeat(1, 3, 1, 1)  # [B, 3, h, w]
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    want = (rgb - mean) / std
    assert torch.allclose(teacher.prepare(student_batch), want, atol=1e-4)
    assert teacher(student_batch).shape == (4, 3)


def test_teacher_from_run_folder_keeps_its_geometry(tmp_path):
    """Size, statistics and classes come from the run's config.json; the head is loaded."""
    model = tiny_cnn()
    folder = save_teacher(tmp_path / "run", model, CLASSES, img_size=24, mean=(0.3,), std=(0.2,))
    teacher = build_teacher(
        TeacherConfig(name="test_resnet", pretrained=str(folder)), CLASSES, 1, GREY_MEAN, GREY_STD
    )
    assert teacher.img_size == (24, 24)
    assert torch.allclose(teacher.mean_kd.flatten(), torch.tensor([0.3]))
    assert torch.allclose(teacher.std_kd.flatten(), torch.tensor([0.2]))
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value), key


def test_a_teacher_needs_weights_and_a_head(tmp_path):
    classes = CLASSES
    with pytest.raises(WeightsError, match="not found"):
        build_teacher(
            TeacherConfig(name="test_resnet", pretrained=str(tmp_path / "nothing.safetensors")),
            classes,
            1,
            GREY_MEAN,
            GREY_STD,
        )
    # An encoder export (no classifier, as MAE writes) cannot teach: its head would be random.
    encoder = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    folder = save_teacher(tmp_path / "encoder", encoder, classes)
    with pytest.raises(WeightsError, match="no trained head"):
        build_teacher(
            TeacherConfig(name="test_resnet", pretrained=str(folder)),
            classes,
            1,
            GREY_MEAN,
            GREY_STD,
        )
    # Hub weights without a classifier, and a hub name without weights, fail before any download.
    with pytest.raises(WeightsError, match="no classifier head"):
        build_teacher(
            TeacherConfig(name="vit_small_patch8_224.dino"), classes, 1, GREY_MEAN, GREY_STD
        )
    with pytest.raises(WeightsError, match="no hub weights"):
        build_teacher(TeacherConfig(name="coatnet_0_224"), classes, 1, GREY_MEAN, GREY_STD)


def test_teacher_class_names_must_be_known(tmp_path):
    model = tiny_cnn()
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    cfg = TeacherConfig(name="test_resnet", pretrained=str(bare), img_size=32)
    with pytest.raises(RecipeError, match="classes are unknown"):
        build_teacher(cfg, CLASSES, 1, GREY_MEAN, GREY_STD)
    named = cfg.model_copy(update={"classes": ["dog", "eel", "cat"]})
    teacher = build_teacher(named, CLASSES, 1, GREY_MEAN, GREY_STD)
    assert teacher.class_index.tolist() == [2, 0, 1]
    # A hub classifier whose output names timm cannot tell (not ImageNet-sized) needs them listed.
    with pytest.raises(RecipeError, match="list them, in order"):
        build_teacher(
            TeacherConfig(name="mvitv2_base_cls.fb_inw21k"), CLASSES, 1, GREY_MEAN, GREY_STD
        )


def test_wrong_architecture_for_the_run_is_a_one_line_error(tmp_path):
    folder = save_teacher(tmp_path / "run", tiny_cnn(), CLASSES)
    with pytest.raises(RecipeError, match="set distill.teacher.name: test_resnet"):
        build_teacher(
            TeacherConfig(name="resnet18", pretrained=str(folder)), CLASSES, 1, GREY_MEAN, GREY_STD
        )


def test_imagenet_hub_teacher_gets_synset_names():
    """An ImageNet-1k classifier's outputs are named by timm's synsets (folder names of ImageNet)."""
    from vittune.models.teacher import _hub_classes

    names = _hub_classes(TeacherConfig(name="resnet18.a1_in1k"), 1000)
    assert len(set(names)) == 1000 and names[0] == "n01440764"


def test_teacher_runs_under_the_run_precision():
    """bf16-mixed: the teacher runs inside the autocast region; bf16-true: a bf16 teacher."""
    task = DistillationTask(
        recipe("soft", tau=2.0), tiny_deit(), frozen(tiny_cnn(), img_size=48), CLASSES
    )
    task.train()
    images, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert task.teacher(images).dtype == torch.bfloat16
        loss = task.training_step((images, targets), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    teacher = frozen(tiny_cnn(), img_size=48)
    reference = teacher(images)
    low = teacher.to(torch.bfloat16)(images.bfloat16())
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.1, rtol=0.05)


def test_unknown_teacher_name_suggests_one():
    with pytest.raises(RecipeError, match="did you mean 'resnet50'"):
        build_teacher(TeacherConfig(name="resnet5"), CLASSES, 1, GREY_MEAN, GREY_STD)
    with pytest.raises(RecipeError, match="Invalid pretrained tag"):
        build_teacher(TeacherConfig(name="resnet50.nope"), CLASSES, 1, GREY_MEAN, GREY_STD)
