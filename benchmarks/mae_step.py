"""Wall-clock of one MAE training step against the same step with every token in the encoder.

The MAE side is vittune's `MaskedAutoencoder`: the encoder sees only the visible 25% of
the patches. The full-token side is the paper's "[M] in encoder" ablation (He et al. 2021,
Table 1c and Section 4.1, 2.8-4.1x slower at 75% masking): the same encoder, decoder, loss
and masking, but masked patches enter the encoder as a learned mask token, so the encoder
runs on all N tokens. Each step is forward, backward and an AdamW update, fp32.

Both sides start from identical weights and use identical batches; repeats alternate the two
sides so that load from other processes hits both alike, and the table shows the median.

    python benchmarks/mae_step.py            # print the table
    python benchmarks/mae_step.py --write    # ... and update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import timm
import torch
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)
from torch import nn

from vittune.models.mae import (
    MaeOutput,
    MaskedAutoencoder,
    build_decoder,
    freeze_sincos_pos_embed,
    random_masking,
    reconstruction_loss,
)
from vittune.recipe.schema import MaeConfig

SECTION = "## MAE step vs full-token step"


@dataclass(frozen=True)
class Config:
    label: str
    model: str
    img_size: int
    patch_size: int
    in_chans: int
    batch: int
    decoder: MaeConfig
    kwargs: dict


CONFIGS = {
    "digits": Config(
        "ViT 6x192, 32 px / patch 8 (16 tokens), decoder 2x128 (recipes/mae_digits_pretrain.yaml)",
        "vit_tiny_patch16_224", 32, 8, 1, 64,
        MaeConfig(decoder_depth=2, decoder_dim=128, decoder_heads=4), {"depth": 6},
    ),
    "small": Config(
        "ViT-S/16, 224 px (196 tokens), decoder 4x256",
        "vit_small_patch16_224", 224, 16, 3, 8,
        MaeConfig(decoder_depth=4, decoder_dim=256, decoder_heads=8), {},
    ),
    "base": Config(
        "ViT-B/16, 224 px (196 tokens), decoder 8x512 (the paper's)",
        "vit_base_patch16_224", 224, 16, 3, 4,
        MaeConfig(decoder_depth=8, decoder_dim=512, decoder_heads=16), {},
    ),
}  # fmt: skip


class FullTokenMae(MaskedAutoencoder):
    """The "[M] in encoder" variant: masked patches become a mask token *before* the encoder."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__(encoder, decoder)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.normal_(self.encoder_mask_token, std=0.02)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> MaeOutput:
        enc, dec = self.encoder, self.decoder
        grid = enc.patch_embed.grid_size
        masking = random_masking(
            images.shape[0], grid[0] * grid[1], self.mask_ratio, images.device, noise
        )
        x = enc.patch_embed(images)  # [B, N, D]
        mask = masking.mask.unsqueeze(-1).to(x.dtype)  # [B, N, 1]
        x = x * (1 - mask) + self.encoder_mask_token * mask
        x = enc.norm(enc.blocks(enc.norm_pre(enc._pos_embed(x))))  # [B, P + N, D]: all tokens
        x = dec.embed(x) + dec.pos_embed  # no gaps to fill: every token is already there
        pred = dec.pred(dec.norm(dec.blocks(x))[:, dec.num_prefix_tokens :])  # [B, N, p*p*C]
        loss = reconstruction_loss(images, pred, masking.mask, self.patch_size, self.norm_pix_loss)
        return MaeOutput(loss, pred, masking)


def build_pair(cfg: Config) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    encoder = timm.create_model(
        cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=0, drop_path_rate=0.0, **cfg.kwargs,
    )  # fmt: skip
    freeze_sincos_pos_embed(encoder)
    decoder = build_decoder(encoder, cfg.decoder)
    mae = MaskedAutoencoder(encoder, decoder)
    full = FullTokenMae(copy.deepcopy(encoder), copy.deepcopy(decoder))
    return mae, full


def time_steps(
    model: nn.Module, images: torch.Tensor, warmup: int, steps: int
) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per training step (forward, backward, AdamW) after `warmup`.

    CPU time is what to read on a machine shared with other jobs (with one thread it does not
    count the time spent waiting for a core); wall time is what a user waits on a quiet one.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            wall, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        model(images).loss.backward()
        optimizer.step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="digits,small,base", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for key in args.configs.split(","):
        cfg = CONFIGS[key]
        mae, full = build_pair(cfg)
        images = torch.randn(cfg.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
        times: dict[str, list[tuple[float, float]]] = {"mae": [], "full": []}
        for repeat in range(args.repeats):
            order = ("mae", "full") if repeat % 2 == 0 else ("full", "mae")
            for name in order:
                model = mae if name == "mae" else full
                times[name].append(time_steps(model, images, args.warmup, args.steps))
        (mae_wall, mae_cpu), (full_wall, full_cpu) = (
            tuple(statistics.median(t[i] for t in times[name]) for i in (0, 1))
            for name in ("mae", "full")
        )
        n = mae.encoder.patch_embed.num_patches
        rows.append(
            f"| {cfg.label} | {cfg.batch} | {n} / {round(n * 0.25)} "
            f"| {full_cpu * 1e3:.0f} | {mae_cpu * 1e3:.0f} | **{full_cpu / mae_cpu:.2f}x** "
            f"| {full_wall * 1e3:.0f} | {mae_wall * 1e3:.0f} | {full_wall / mae_wall:.2f}x |"
        )
        print(rows[-1], flush=True)

    command = " ".join(["python benchmarks/mae_step.py", *sys.argv[1:]])
    text = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine()}; {args.threads} torch thread(s); fp32.",
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
            "Mask ratio 0.75. Full-token: masked patches enter the encoder as a mask token (the",
            'paper\'s "[M] in encoder"); MAE: the encoder sees the visible 25% only. ms per training',
            f"step (forward, backward, AdamW), median of {args.repeats} repeats of {args.steps} "
            "steps, CPU time (read this one on a shared machine) and wall time. The paper reports",
            "2.8-4.1x less wall-clock for ViT-L/H on TPUs.",
            f"Load average while it ran: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
            "",
            "| configuration | batch | encoder tokens full / MAE | full CPU ms | MAE CPU ms "
            "| speed-up (CPU) | full wall ms | MAE wall ms | speed-up (wall) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print()
    print(text)
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
