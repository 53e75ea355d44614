"""MAE pretraining: a timm ViT encoder (`self.model`, exported alone) and a light decoder."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from vittune.models.mae import (
    NORM_PIX_EPS,
    MaeOutput,
    MaskedAutoencoder,
    build_decoder,
    check_encoder,
    freeze_sincos_pos_embed,
    freeze_unused_encoder_parts,
    patchify,
    unpatchify,
)
from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.tasks.figures import log_image, save_mae_grid

VAL_MASK_SEED = 1234  # validation masks are the same every epoch, so val/loss is comparable
MASKED_GREY = 0.5  # display value of removed patches in the reconstruction grid


class MaeTask(VitTask):
    default_monitor = ("val/loss", "min")

    def __init__(
        self,
        recipe: Recipe,
        encoder: nn.Module,
        run_dir: str | Path | None = None,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
    ) -> None:
        super().__init__(recipe, run_dir, encoder=encoder, mean=mean, std=std)

    def configure_models(
        self, encoder: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        """The encoder stays the plain timm module (timm key names); the decoder is built here.

        The loss is part of the autoencoder's forward (masked patches only), so MAE has no
        separate losses or metrics to configure. Recipe rules (no layer decay, decoder
        geometry) are checked with the recipe (recipe/checks.py).
        """
        check_encoder(encoder)
        if self.recipe.mae is None:  # load_recipe adds the section, with MaeConfig's defaults
            raise ValueError("MaeTask needs a recipe with a `mae:` section")
        self.cfg = self.recipe.mae
        self.model = encoder
        if self.cfg.pos_embed == "sincos":
            freeze_sincos_pos_embed(encoder)
        freeze_unused_encoder_parts(encoder)
        self.decoder = build_decoder(encoder, self.cfg)
        channels = encoder.patch_embed.proj.in_channels
        # Display only (the grid PNG); not part of the checkpoint.
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1), persistent=False)
        self._vis_images: torch.Tensor | None = None

    @cached_property
    def autoencoder(self) -> MaskedAutoencoder:
        """A view over `self.model` + `self.decoder`, built once (it owns no parameters).

        `cached_property` stores it in the instance `__dict__`, outside `nn.Module`'s registry,
        so the checkpoint keeps the timm key names under `model.` and `decoder.` alone.
        """
        return MaskedAutoencoder(
            self.model, self.decoder, self.cfg.mask_ratio, self.cfg.norm_pix_loss
        )

    def optimised_module(self) -> nn.Module:
        return self.autoencoder

    def compiled_modules(self) -> list[nn.Module]:
        """The whole MAE step (masking, encoder, decoder, loss) as one graph: the view owns no
        parameters and is outside the state_dict, so compiling it changes no key."""
        return [self.autoencoder]

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> MaeOutput:
        return self.autoencoder(images, generator=generator)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0]  # labels, if any, are ignored
        loss = self(images).loss
        self.log_train_loss("train/loss", loss, len(images))
        return loss

    def _fixed_generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed(VAL_MASK_SEED + batch_idx)
        return generator

    def validation_step(self, batch, batch_idx: int) -> None:
        images = batch[0]
        loss = self(images, self._fixed_generator(batch_idx, images.device)).loss
        self.log(
            "val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(images)
        )
        if batch_idx == 0:
            self._vis_images = images[: self.cfg.vis_num_images].detach()

    def on_validation_epoch_end(self) -> None:
        images, self._vis_images = self._vis_images, None
        due = (self.current_epoch + 1) % self.cfg.vis_every_n_epochs == 0
        if images is None or not due or self.run_dir is None:
            return
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        title = f"MAE, mask ratio {self.cfg.mask_ratio}, epoch {self.current_epoch}"
        if self.cfg.norm_pix_loss:
            title += "\n(predictions shown at each patch's true mean and spread)"
        name = f"epoch_{self.current_epoch:03d}.png"
        path = save_mae_grid(
            self.reconstruction_columns(images), self.run_dir / "reconstructions" / name, title
        )
        log_image(self.loggers, "val/reconstruction", path, step=self.global_step)

    @torch.no_grad()
    def reconstruction_columns(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Original / masked / reconstruction / reconstruction + visible, in [0, 1] for display."""
        out = self(images, self._fixed_generator(0, images.device))
        p = self.autoencoder.patch_size
        grid = tuple(self.model.patch_embed.grid_size)
        channels = images.shape[1]
        target = patchify(images, p)  # [B, N, p*p*C]
        pred = out.pred.float()
        if self.cfg.norm_pix_loss:
            # Predictions live in per-patch normalised units; show them at the true patch's
            # mean and spread so that the picture is comparable with the original.
            spread = (target.var(-1, keepdim=True) + NORM_PIX_EPS).sqrt()  # [B, N, 1]
            pred = pred * spread + target.mean(-1, keepdim=True)
        mask = out.masking.mask.unsqueeze(-1)  # [B, N, 1]
        grey = (MASKED_GREY - self.mean) / self.std  # [1, C, 1, 1] in normalised units
        grey_patches = patchify(grey.expand_as(images), p)

        def show(patches: torch.Tensor) -> torch.Tensor:
            pixels = unpatchify(patches, p, grid, channels) * self.std + self.mean
            return pixels.clamp(0, 1).cpu()

        return {
            "original": show(target),
            "masked": show(target * (1 - mask) + grey_patches * mask),
            "reconstruction": show(pred),
            "reconstruction + visible": show(target * (1 - mask) + pred * mask),
        }
