"""Lightning callbacks vittune adds to the Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from vittune.evaluation.attention_figures import display_image, save_attention_figure
from vittune.models.attention import attention_maps
from vittune.models.compiling import eager
from vittune.models.freezing import frozen_parameter_names
from vittune.optim.param_groups import build_param_groups
from vittune.recipe.schema import FreezeConfig, OptimConfig
from vittune.tasks.figures import log_image


class GradualUnfreeze(Callback):
    """Unfreeze blocks on a schedule of epochs, adding their parameters to the optimiser.

    Written by hand because Lightning's `BaseFinetuning` adds groups that the lr scheduler
    does not know (so warmup/cosine never reach them) and that DDP does not all-reduce.
    Here each new group gets its layer-decay lr, joins the scheduler, and, under DDP,
    its gradients are averaged across ranks before every optimiser step.
    """

    def __init__(self, freeze: FreezeConfig, optim: OptimConfig) -> None:
        self.freeze = freeze
        self.optim = optim
        self.late_params: list[torch.nn.Parameter] = []
        self.resumed_epoch: int | None = None  # set by a resume: the checkpoint's epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed run builds its optimiser frozen as at epoch 0; replay, in order, the
        unfreezes the checkpointed run had made, so the groups (and the order of parameters in
        them) are those its optimiser state was saved with. Lightning loads that state after
        this hook; an epoch whose start is replayed here finds nothing new to add when it
        starts again."""
        if self.resumed_epoch is None:
            return
        for epoch in sorted(self.freeze.unfreeze_schedule):
            if epoch <= self.resumed_epoch:
                self.unfreeze(trainer, pl_module, epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.unfreeze(trainer, pl_module, trainer.current_epoch)

    def unfreeze(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if epoch not in self.freeze.unfreeze_schedule:
            return
        model = pl_module.optimised_module()
        optimizer = trainer.optimizers[0]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        still_frozen = frozen_parameter_names(
            model, self.freeze.unfreeze_schedule[epoch], linear_probe=False
        )
        new = [
            p
            for n, p in model.named_parameters()
            if n not in still_frozen and id(p) not in in_optimizer
        ]
        for p in new:
            p.requires_grad_(True)
        if not new:
            return
        scheduler = (
            trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        )
        base_lr = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        base_lr /= optimizer.param_groups[0].get("layer_scale", 1.0)
        new_ids = {id(p) for p in new}
        existing = {g.get("name"): g for g in optimizer.param_groups}
        for group in build_param_groups(model, self.optim, base_lr):
            params = [p for p in group["params"] if id(p) in new_ids]
            if not params:
                continue
            if group["name"] in existing:  # same lr and decay: join it (state is created lazily)
                existing[group["name"]]["params"].extend(params)
                continue
            group = {k: v for k, v in group.items() if k not in ("param_names", "layer_id")}
            group["params"] = params
            group["initial_lr"] = group["lr"]
            if scheduler is not None:
                factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
                group["lr"] = group["initial_lr"] * factor
                scheduler.base_lrs.append(group["initial_lr"])
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                scheduler._last_lr.append(group["lr"])
            optimizer.add_param_group(group)
        self.late_params.extend(new)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer
    ) -> None:
        # DDP registered its buckets when the model was wrapped, before these were unfrozen.
        if trainer.world_size < 2 or not self.late_params or not dist.is_initialized():
            return
        grads = [p.grad for p in self.late_params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= trainer.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class AttentionMaps(Callback):
    """Every `every_n_epochs`, the attention of a fixed set of validation images, saved to
    `<run>/attention/epoch_NNN/` and logged to W&B (`logging.attention_every_n_epochs`)."""

    def __init__(
        self,
        run_dir: Path,
        every_n_epochs: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_images: int = 4,
    ) -> None:
        self.run_dir, self.every, self.num_images = run_dir, every_n_epochs, num_images
        self.mean, self.std = mean, std
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None  # [N] class ids (single-label), else None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if self.images is None and batch_idx == 0:  # the val loader is not shuffled: fixed set
            self.images = batch[0][: self.num_images].detach().clone()
            labels = batch[1][: self.num_images]
            self.labels = labels.detach().cpu().clone() if labels.ndim == 1 else None

    def _outcome(self, pl_module: L.LightningModule, k: int, probs: torch.Tensor) -> str:
        """ ": true a, predicted b (0.93)" for a single-label classifier, else nothing."""
        classes = getattr(pl_module, "classes", None)
        if self.labels is None or not classes or len(probs) != len(classes):
            return ""
        best = int(probs.argmax())
        true = classes[int(self.labels[k])]
        return f": true {true}, predicted {classes[best]} ({float(probs[best]):.2f})"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.images is None or trainer.sanity_checking or (epoch + 1) % self.every:
            return
        if not trainer.is_global_zero:
            return
        # Eager: the capture hooks and the unfused attention path would each recompile.
        with eager(pl_module.model) as model:
            heads, rollout = attention_maps(model, self.images.to(pl_module.device))
            with torch.no_grad():
                probs = model(self.images.to(pl_module.device)).float().softmax(-1).cpu()
        folder = self.run_dir / "attention" / f"epoch_{epoch:03d}"
        for k in range(len(self.images)):
            path = save_attention_figure(
                display_image(self.images[k], self.mean, self.std),
                heads[k].cpu().numpy(),
                rollout[k].cpu().numpy(),
                folder / f"image_{k}.png",
                f"validation image {k}, epoch {epoch}" + self._outcome(pl_module, k, probs[k]),
            )
            log_image(trainer.loggers, f"val/attention_{k}", path)
