"""A hand-written timm + torch fine-tuning loop: the reference `end_to_end.py` times vittune against.

What a user would write without vittune, on an image folder with `train/` and `val/`:
torchvision's `ImageFolder` and v2 transforms, a `DataLoader`, `timm.create_model`, AdamW with
timm's usual weight-decay groups, a cosine `LambdaLR` stepped every step, top-1 accuracy on
the validation split after every epoch and `torch.save` of the weights after every epoch.

It prints `ready` once data, model and optimiser exist, one line per epoch and the final
validation accuracy, so that the benchmark can split its wall time into phases.

    python benchmarks/plain_timm_loop.py DATA OUT --epochs 3 --img-size 64 --patch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import timm.optim
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, int]:
    size = (args.img_size, args.img_size)
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std)]
    train_tf = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()]
        + finish
    )
    val_tf = v2.Compose([v2.ToImage(), v2.Resize(size)] + finish)
    train = datasets.ImageFolder(str(args.data / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(args.data / "val"), transform=val_tf)
    common = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    train_loader = DataLoader(train, shuffle=True, drop_last=True, **common)
    val_loader = DataLoader(val, shuffle=False, **common)
    return train_loader, val_loader, len(train.classes)


@torch.inference_mode()
def top1(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:  # [B, C, H, W], [B]
        correct += (model(images).argmax(dim=1) == labels).sum().item()
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("out", type=Path, help="where the weights are saved")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='e.g. {"depth": 4}')
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--mean", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    parser.add_argument("--std", type=float, nargs=3, default=(0.5, 0.5, 0.5))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_loader, val_loader, num_classes = loaders(args)
    model = timm.create_model(
        args.model,
        pretrained=False,
        num_classes=num_classes,
        img_size=args.img_size,
        patch_size=args.patch_size,
        drop_path_rate=args.drop_path,
        **args.model_kwargs,
    )
    # timm's groups: no weight decay on norms, biases, position embedding and class token
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay
    )
    total = args.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))
    )
    loss_fn = nn.CrossEntropyLoss()
    args.out.mkdir(parents=True, exist_ok=True)
    print("ready", flush=True)

    accuracy = float("nan")
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:  # [B, C, H, W], [B]
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        accuracy = top1(model, val_loader)
        torch.save(model.state_dict(), args.out / f"epoch{epoch}.pt")
        seconds = time.perf_counter() - start
        print(
            f"epoch {epoch}  train/loss {loss.item():.3f}  val/acc1 {accuracy:.3f}  {seconds:.1f} s",
            flush=True,
        )
    print(f"final val/acc1 {accuracy:.4f}", flush=True)


if __name__ == "__main__":
    main()
