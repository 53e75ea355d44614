"""A hand-written timm + torch fine-tuning loop: the reference `end_to_end.py` times vittune against.

What a user would write without vittune, on an image folder with `train/`, `val/` and
optionally `test/`: torchvision's `ImageFolder` and v2 transforms, a `DataLoader`,
`timm.create_model`, AdamW with timm's usual weight-decay groups, a cosine `LambdaLR` (after
an optional linear warm-up) stepped every step, optional label smoothing and gradient-norm
clipping, top-1 accuracy on the validation split after every epoch, `torch.save` of the
weights whenever it improves, and top-1 of those best weights on `test/` at the end.

It prints `ready` once data, model and optimiser exist, one line per epoch, the final
validation accuracy and the test accuracy, so that the benchmark can split its wall time into
phases.

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
    start = [v2.ToImage()] + ([v2.Grayscale(1)] if args.in_chans == 1 else [])
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std)]
    augment = [v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()]
    train_tf = v2.Compose(start + (augment if args.augment else [v2.Resize(size)]) + finish)
    val_tf = v2.Compose(start + [v2.Resize(size)] + finish)
    train = datasets.ImageFolder(str(args.data / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(args.data / "val"), transform=val_tf)
    train_loader = DataLoader(train, shuffle=True, drop_last=True, **loader_args(args))
    val_loader = DataLoader(val, shuffle=False, **loader_args(args))
    return train_loader, val_loader, len(train.classes)


def loader_args(args: argparse.Namespace) -> dict:
    return dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )


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
    parser.add_argument("--in-chans", type=int, default=3, help="1: images read as grey")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip; 0: none")
    parser.add_argument("--mean", type=float, nargs="+", default=(0.5, 0.5, 0.5))
    parser.add_argument("--std", type=float, nargs="+", default=(0.5, 0.5, 0.5))
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
        in_chans=args.in_chans,
        drop_path_rate=args.drop_path,
        **args.model_kwargs,
    )
    # timm's groups: no weight decay on norms, biases, position embedding and class token
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay
    )
    per_epoch = len(train_loader)
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch

    def factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    args.out.mkdir(parents=True, exist_ok=True)
    best_path = args.out / "best.pt"
    print("ready", flush=True)

    accuracy, best = float("nan"), -1.0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        for images, labels in train_loader:  # [B, C, H, W], [B]
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
        accuracy = top1(model, val_loader)
        if accuracy > best:
            best = accuracy
            torch.save(model.state_dict(), best_path)
        seconds = time.perf_counter() - start
        print(
            f"epoch {epoch}  train/loss {loss.item():.3f}  val/acc1 {accuracy:.3f}  {seconds:.1f} s",
            flush=True,
        )
    print(f"final val/acc1 {accuracy:.4f}", flush=True)
    if (args.data / "test").is_dir():
        model.load_state_dict(torch.load(best_path, weights_only=True))
        test_tf = val_loader.dataset.transform
        test = datasets.ImageFolder(str(args.data / "test"), transform=test_tf)
        test_loader = DataLoader(test, shuffle=False, **loader_args(args))
        print(f"test (best weights) acc1 {top1(model, test_loader):.4f}", flush=True)


if __name__ == "__main__":
    main()
