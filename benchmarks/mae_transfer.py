"""Does MAE pretraining transfer? Digits, 10% of the labels, pretrained vs from scratch.

1. `vittune pretrain-mae recipes/mae_digits_pretrain.yaml`: MAE on every digit, labels unread.
2. `vittune finetune recipes/mae_digits_finetune.yaml` twice with the same labelled 10%, the
   same recipe, seed and budget: once from the MAE encoder, once from random weights.

Both fine-tunes run at the same time, one torch thread each, so that load from other
processes hits both arms alike. The table reports validation top-1 accuracy at the last
epoch (no selection) and the best epoch's, plus wall time; `--write` also updates the
section of benchmarks/RESULTS.md.

    python benchmarks/mae_transfer.py                      # 21 min on 2 busy CPU cores
    python benchmarks/mae_transfer.py --pretrain-epochs 100 --write
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## MAE transfer on digits (10% of the labels)"
VITTUNE = shutil.which("vittune", path=str(Path(sys.executable).parent)) or "vittune"


def launch(
    command: str, recipe: str, overrides: list[str], work: Path, threads: int
) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    env.pop("VITTUNE_RUN_DIR", None)
    log = (work / f"{overrides[-1].split('=')[-1]}.log").open("w")
    return subprocess.Popen(
        [VITTUNE, command, str(REPO / "recipes" / recipe), *overrides],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait(process: subprocess.Popen, name: str, work: Path) -> None:
    if process.wait() != 0:
        tail = (work / f"{name}.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{name} failed:\n" + "\n".join(tail))


def accuracies(run: Path) -> tuple[float, float, int]:
    """(last-epoch val/acc1, best val/acc1, epochs) from the run's CSV log."""
    with (run / "csv" / "metrics.csv").open() as handle:
        values = [float(r["val/acc1"]) for r in csv.DictReader(handle) if r.get("val/acc1")]
    return values[-1], max(values), len(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="trainer seed of every run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep runs here (default: a temp dir)"
    )
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mae-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["logging.wandb=false", f"trainer.seed={args.seed}"]
    start = time.time()
    pretrain = launch(
        "pretrain-mae",
        "mae_digits_pretrain.yaml",
        [*common, f"trainer.max_epochs={args.pretrain_epochs}", "logging.name=mae"],
        work,
        args.threads,
    )
    wait(pretrain, "mae", work)
    pretrain_s = time.time() - start
    finetune = [*common, f"trainer.max_epochs={args.finetune_epochs}"]
    start = time.time()
    arms = {
        "MAE-pretrained": launch(
            "finetune",
            "mae_digits_finetune.yaml",
            [*finetune, f"model.pretrained={work / 'runs' / 'mae'}", "logging.name=pretrained"],
            work,
            args.threads,
        ),
        "from scratch": launch(
            "finetune",
            "mae_digits_finetune.yaml",
            [*finetune, "model.pretrained=false", "logging.name=scratch"],
            work,
            args.threads,
        ),
    }
    for process, name in zip(arms.values(), ("pretrained", "scratch"), strict=True):
        wait(process, name, work)
    finetune_s = time.time() - start

    rows = []
    for label, name in (("MAE-pretrained", "pretrained"), ("from scratch", "scratch")):
        last, best, epochs = accuracies(work / "runs" / name)
        rows.append(f"| {label} | {epochs} | {last:.3f} | {best:.3f} |")
    table = [
        "| fine-tune start | epochs | val top-1, last epoch | val top-1, best epoch |",
        "|---|---|---|---|",
        *rows,
    ]
    command = " ".join(["python benchmarks/mae_transfer.py", *sys.argv[1:]])
    text = "\n".join(
        [
            SECTION,
            "",
            f"Machine: {machine()}; {args.threads} torch thread(s) per fine-tune, run side by side.",
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
            f"Pretraining: {args.pretrain_epochs} epochs on the 1,797 digits without labels (1,617 "
            f"trained on, 180 for val/loss; {pretrain_s / 60:.1f} min). Fine-tuning: "
            f"{args.finetune_epochs} epochs on 10% of the training labels (143 images), validated "
            f"on 20% of the digits (359 images; {finetune_s / 60:.1f} min for both).",
            "",
            *table,
            "",
        ]
    )
    print(text)
    print(f"runs in {work}")
    if args.write:
        write_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
