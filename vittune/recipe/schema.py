"""The recipe schema: the single source of truth for every setting vittune reads.

Every section forbids unknown keys (a misspelt key is an error, never a silent no-op).
`None` means "keep what the backbone or library would do by default".
"""

from __future__ import annotations

import builtins
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from vittune.files import folder_name_problem

Command = Literal["finetune", "pretrain-mae", "distill"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def image_size_pair(value: Any) -> Any:
    """`224` -> (224, 224): every image size is (height, width) from here on, in one place."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, list | tuple) and any(isinstance(v, int) and v <= 0 for v in value):
        raise ValueError("image sizes must be positive")
    return value


class ModelConfig(Section):
    """Which timm backbone, from which weights, at which input geometry."""

    name: str = "vit_small_patch16_224"
    pretrained: bool | str = False  # true: timm hub weights; a path: local file or run folder
    pretrained_sha256: str | None = None
    img_size: tuple[int, int] = (224, 224)  # an int means a square; stored as (height, width)
    patch_size: int | None = None  # resample the patch embedding (FlexiViT) when set
    in_chans: int = Field(3, ge=1)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    head_init: Literal["trunc_normal", "zeros"] = "trunc_normal"
    keep_head: bool = False  # keep the pretrained head when its classes match the data's
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra timm create_model arguments

    _img_size = field_validator("img_size", mode="before")(image_size_pair)


# PIL's default `Image.MAX_IMAGE_PIXELS`: a quarter GiB of 8-bit RGB.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class DataConfig(Section):
    """Where images come from and how they are decoded and batched."""

    root: str | None = None  # image folder: <root>/<class>/* or <root>/{train,val,test}/<class>/*
    csv: str | None = None  # manifest with columns path,label[,split]; paths relative to the CSV
    builtin: Literal["digits"] | None = None  # scikit-learn's digits, exported to an image folder
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # keep a stratified subset of the training images (few-label experiments)
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    split_seed: int = 0
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = None
    num_workers: int = Field(2, ge=0)
    multi_label: bool = False  # CSV labels separated by ';'
    intensity: Literal["dtype", "minmax"] = (
        "dtype"  # divide by the dtype's max, or per-image min-max
    )
    mean: tuple[float, ...] | None = None  # None: the backbone's pretrained config
    std: tuple[float, ...] | None = None
    on_corrupt: Literal["skip", "error"] = "skip"
    # the same image (resolved path) listed twice or in two splits: refused, or kept once
    allow_duplicates: bool = False
    # refuse images whose header declares more pixels (decompression bombs); null or 0: no limit
    max_image_pixels: int | None = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=0)
    labelled: bool = True  # false: a folder of images without class sub-folders (MAE)
    # files: a folder, CSV or builtin set, decoded per image; litdata: shards written by
    # `vittune prepare-data`, read from data.root (a local folder or an object-store URL)
    format: Literal["files", "litdata"] = "files"
    # decode each image once: none (every epoch decodes), memory (arrays in RAM, shared with
    # the workers), disk (a memory-mapped file under data.cache_dir, reused across runs)
    cache: Literal["none", "memory", "disk"] = "none"
    cache_dir: str | None = None  # None: $VITTUNE_CACHE_DIR, else ~/.cache/vittune/decoded
    pin_memory: bool | None = None  # None: on when training on a GPU
    prefetch_factor: int | None = Field(None, ge=1)  # batches each worker prepares ahead
    # DICOM (docs/medical.md): the VOI window after the modality LUT; auto: the file's first
    # window (else its full stored range), none: the full stored range, [center, width]: yours
    dicom_window: Literal["auto", "none"] | tuple[float, float] = "auto"
    # which frame of a multi-frame file is the image; all: one sample per frame
    dicom_frame: Literal["middle", "first", "all"] = "middle"
    # patient/study-level splits: val and test are carved by group, never splitting one
    group_column: str | None = None  # CSV column naming each image's group (patient ID)
    group_pattern: str | None = None  # regex with one group, searched in the path under root
    allow_group_overlap: bool = False  # true: given splits may share a group (not advised)
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # hold out a test split (by group)
    splits_from: str | None = None  # a run's splits.csv: reuse its exact split

    @field_validator("dicom_window")
    @classmethod
    def _window_width(cls, value: object) -> object:
        if isinstance(value, tuple) and value[1] < 1:
            raise ValueError("dicom_window is [center, width] with width >= 1, or auto / none")
        return value


class TransformSpec(Section):
    """One albumentations transform by class name, with its keyword arguments."""

    model_config = ConfigDict(extra="allow")
    name: str


class AugmentConfig(Section):
    """Training-time augmentation; evaluation always resizes and normalises only."""

    preset: Literal["none", "light", "strong", "medical"] = "light"
    transforms: list[TransformSpec] | None = None  # replaces the preset when given
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)


class LossConfig(Section):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["none", "balanced"] | list[float] = "none"


class OptimConfig(Section):
    name: str = "adamw"  # any timm optimizer name (timm.optim.list_optimizers())
    lr: float = Field(1e-3, gt=0.0)
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr x effective_batch / 256
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] | None = None
    momentum: float = Field(0.9, ge=0.0)
    layer_decay: float | None = None  # layer-wise lr decay in (0, 1]

    @field_validator("layer_decay")
    @classmethod
    def _decay_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError("layer_decay must be in (0, 1]; use null to turn it off")
        return value


class ScheduleConfig(Section):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_epochs when set
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class TrainerConfig(Section):
    """Passed to lightning.Trainer; devices, nodes and strategy drive DDP."""

    max_epochs: int = Field(10, ge=1)
    max_steps: int = -1
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: str | None = None  # None: bf16-mixed on a GPU that supports it, else 32-true
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = None
    seed: int = 42
    deterministic: bool = False
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    check_val_every_n_epoch: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    early_stopping_patience: int | None = None
    # a vittune checkpoint to continue from (into a new run folder), or `auto`: the newest
    # checkpoint of <logging.run_dir>/<logging.name>, continued in that same folder
    resume_from: str | None = None
    # torch.compile for training (backbone; MAE: encoder + decoder; distill: student and
    # teacher); the first steps pay the compilation (docs/compile.md)
    compile: bool = False


class CheckpointConfig(Section):
    monitor: str | None = None  # None: the task's main metric (val/acc1, val/loss for MAE)
    mode: Literal["max", "min"] | None = None
    save_top_k: int = 1
    # also rewrite last.ckpt every n optimiser steps (it is always rewritten at epoch ends)
    every_n_steps: int | None = Field(None, ge=1)
    # with a test split, the best weights are tested after training; also the last ones?
    test_last: bool = False


class LoggingConfig(Section):
    run_dir: str = "runs"
    name: str | None = None  # None: <recipe file stem>-<timestamp>
    wandb: bool = True
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    project: str = "vittune"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)
    group: str | None = None  # W&B run group (a sweep's trials share the sweep's name)
    # save the attention maps of a few fixed validation images every n epochs (ViTs)
    attention_every_n_epochs: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _one_folder(cls, value: str | None) -> str | None:
        if value is not None and (problem := folder_name_problem(value)):
            raise ValueError(f"{problem}; give a plain folder name such as run-1")
        return value


class FreezeConfig(Section):
    """Which parameters train; frozen ones get no optimiser state."""

    linear_probe: bool = False  # only the head trains
    frozen_blocks: int = Field(0, ge=0)  # patch embedding and the first k blocks frozen
    unfreeze_schedule: dict[int, int] = Field(default_factory=dict)  # epoch -> blocks still frozen


class MaeConfig(Section):
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)
    decoder_depth: int = Field(8, ge=1)
    decoder_dim: int = Field(512, ge=8)
    decoder_heads: int = Field(16, ge=1)
    norm_pix_loss: bool = True
    pos_embed: Literal["sincos", "learned"] = "sincos"
    vis_every_n_epochs: int = Field(1, ge=1)
    vis_num_images: int = Field(8, ge=1)


class TeacherConfig(Section):
    name: str
    pretrained: bool | str = True  # hub weights, a local file, or a vittune run folder
    pretrained_sha256: str | None = None
    img_size: tuple[int, int] | None = None  # None: the teacher's own default

    _img_size = field_validator("img_size", mode="before")(image_size_pair)

    in_chans: int | None = None  # None: the student's
    mean: tuple[float, ...] | None = None  # None: the teacher's pretrained config
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None  # None: read from a vittune run's config.json
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DistillConfig(Section):
    teacher: TeacherConfig
    type: Literal["hard", "soft", "none"] = "hard"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    tau: float = Field(1.0, gt=0.0)


class SpaceEntry(Section):
    """One searched recipe key: exactly one of `loguniform`, `uniform`, `int` ([low, high]) or
    `choice` (a list of numbers, strings, booleans or null)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    # `int` names the field as users write it, so the type below is spelt builtins.int
    int: tuple[builtins.int, builtins.int] | None = None
    choice: list[bool | builtins.int | float | str | None] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceEntry:
        given = [
            k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of loguniform, uniform, int or choice"
                f" (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
            return self
        low, high = getattr(self, kind)
        if not low < high:
            raise ValueError(f"{kind} needs [low, high] with low < high (got [{low}, {high}])")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs a positive low end (got {low})")
        return self

    @model_serializer(mode="wrap")
    def _only_its_kind(self, handler: Any) -> dict[str, Any]:
        """Dumped as written (`{loguniform: [1.0e-5, 1.0e-3]}`), without the unused kinds."""
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def kind(self) -> str:
        return next(
            k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None
        )


class SweepConfig(Section):
    """`vittune sweep`: which recipe keys to search, and how (Optuna; docs/sweeps.md)."""

    space: dict[str, SpaceEntry] = Field(default_factory=dict)  # dotted recipe key -> range
    sampler: Literal["tpe", "random", "grid"] = "tpe"  # grid: every space entry int or choice
    pruner: Literal["median", "hyperband", "none"] = "median"  # on the per-epoch monitor
    trials: int = Field(20, ge=1)  # finished trials the study aims for (all workers together)
    seed: int | None = None  # the sampler's seed; None: trainer.seed
    # trials that finish before TPE models the space and before the median pruner prunes
    startup_trials: int = Field(2, ge=0)
    prune_after_epochs: int = Field(1, ge=1)  # epochs every trial trains before it can be pruned
    # trial 0 trains the recipe's own values (when they lie in the space): the start to beat
    start_from_recipe: bool = True
    # a running trial writes a heartbeat this often; one silent for 3x as long is failed and
    # queued again (its worker died on another machine)
    heartbeat_s: int = Field(30, ge=1)


PeftMethod = Literal["none", "lora", "dora", "ia3", "vpt", "vpt_deep", "ssf", "bitfit"]


class PeftConfig(Section):
    """Parameter-efficient transfer: train small adapters on a frozen backbone (docs/peft.md).

    The head (and a DeiT's distillation head) always trains in full.
    """

    method: PeftMethod = "none"
    rank: int = Field(8, ge=1)  # lora/dora: rank of the update
    alpha: float = Field(16.0, gt=0.0)  # lora/dora: the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # lora/dora: dropout on the adapter's input
    # modules inside every block that lora/dora/ia3/ssf adapt (timm names under blocks.N)
    targets: list[str] = Field(
        default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    )
    prompt_tokens: int = Field(10, ge=1)  # vpt/vpt_deep: learned tokens per block
    bitfit_norms: bool = False  # bitfit: also train the norms' scale (their bias always trains)


class EmaConfig(Section):
    """An exponential moving average of the trained model's weights (timm's ModelEmaV3).

    Validation scores the average (`val/*`) and the raw weights (`val_raw/*`); the export and
    the test report use the average.
    """

    decay: float = Field(0.9998, gt=0.0, lt=1.0)
    every_n_steps: int = Field(1, ge=1)  # update after every n optimiser steps
    start_epoch: int = Field(0, ge=0)  # before this epoch the average copies the weights


class Recipe(Section):
    task: Command | None = None  # optional: checked against the command that runs it
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    mae: MaeConfig | None = None
    distill: DistillConfig | None = None
    sweep: SweepConfig | None = None  # read by `vittune sweep` only
    peft: PeftConfig = Field(default_factory=PeftConfig)
    ema: EmaConfig | None = None
