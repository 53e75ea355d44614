"""The issue's done-when, through the `vittune` console script: quickstart.yaml with
peft.method=lora from a run folder trains under 10 % of the parameters, writes adapter/ and a
merged model.safetensors that plain timm loads with the predictions `vittune evaluate` made."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import timm
import torch
from conftest import run_cli
from helpers import RECIPES

from vittune.inference.evaluate import choose_samples
from vittune.inference.trained_run import build_trained, load_trained_run
from vittune.models.adapters import load_adapter
from vittune.recipe.load import load_recipe
from vittune.tasks.assembly import build
from vittune.training.run import fit

QUICK = ["trainer.max_epochs=1", "data.num_workers=0", "logging.wandb=false"]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory, vittune_cache: Path) -> Path:
    """quickstart.yaml briefly trained: the weights the transfer starts from."""
    root = tmp_path_factory.mktemp("peft")
    extra = [*QUICK, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    recipe = load_recipe(
        RECIPES / "quickstart.yaml",
        [*extra, f"logging.run_dir={root / 'runs'}", "logging.name=source"],
        command="finetune",
    )
    return fit(recipe, "finetune", RECIPES / "quickstart.yaml", log=lambda _: None).run_dir


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_quickstart_lora_from_a_run_exports_merged_weights_plain_timm_reproduces(
    source_run: Path,
) -> None:
    work = source_run.parent.parent
    result = run_cli(
        "finetune",
        str(RECIPES / "quickstart.yaml"),
        "peft.method=lora",
        f"model.pretrained={source_run}",
        "ema={decay: 0.9}",
        "optim.layer_decay=0.75",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "logging.name=lora",
        *QUICK,
        cwd=work,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = work / "runs" / "lora"
    share = float(re.search(r"trainable \(([\d.]+)%", result.stdout).group(1))
    assert 0 < share < 10
    built = build(load_recipe(run / "recipe.yaml", [], command="finetune"), "finetune")
    counts = [p.numel() for p in built.task.model.parameters()]
    trained = [p.numel() for p in built.task.model.parameters() if p.requires_grad]
    assert share == round(100 * sum(trained) / sum(counts), 1)  # the EMA copy not counted
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (run / "adapter").iterdir()
    }

    # every adapter parameter trains at its block's scale: 6 blocks (ids 1..6), head id 7
    rows = [r for r in csv_rows(run / "csv" / "metrics.csv") if r.get("lr/layer_7_decay")]
    assert rows
    for row in rows:
        for block in range(1, 7):
            ratio = float(row[f"lr/layer_{block}_decay"]) / float(row["lr/layer_7_decay"])
            assert ratio == pytest.approx(0.75 ** (7 - block))
    assert any(r.get("val_raw/acc1") for r in csv_rows(run / "csv" / "metrics.csv"))

    evaluated = run_cli("evaluate", str(run), cwd=work, env={"OMP_NUM_THREADS": "1"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    predicted = {r["path"]: r for r in csv_rows(run / "eval" / "val" / "predictions.csv")}

    plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    assert type(plain).__name__ == "VisionTransformer"
    trained = load_trained_run(run)
    found, _ = choose_samples(trained, "auto", False)
    dataset = build_trained(trained, found).datamodule.dataset("val")
    base = timm.create_model(f"local-dir:{source_run}", pretrained=True)  # the start weights
    reapplied = load_adapter(base, run / "adapter").eval()
    with torch.no_grad():
        for index, sample in enumerate(found.splits["val"][:40]):
            image = dataset[index][0][None]  # [1, C, H, W] as evaluate prepared it
            logits = plain(image)  # [1, K]
            probs = logits.softmax(-1)[0]
            row = predicted[str(sample.path)]
            assert int(probs.argmax()) == int(row["predicted"])
            assert float(probs.max()) == pytest.approx(float(row["top1_prob"]), abs=2e-6)
            assert torch.allclose(reapplied(image), logits, atol=1e-5)
