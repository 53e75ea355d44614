"""EMA of the weights (`ema:`): the average follows timm's formula step by step, validation
scores it as val/* and the raw weights as val_raw/*, an interrupted run resumes to the same
average, and the export holds the average."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_class_images
from helpers import tiny, write_recipe
from safetensors.torch import load_file

from vittune.recipe.load import load_recipe
from vittune.tasks.assembly import build
from vittune.training.run import fit

DETERMINISTIC = (
    "data.batch_size=8",
    "augment.preset=none",
    "model.drop_path_rate=0.0",
    "schedule.name=constant",
    "optim.lr=3e-3",
)


def recipe_for(tmp_path: Path, *overrides: str):
    data = tmp_path / "data"
    if not data.is_dir():
        make_class_images(data, {"a": 12, "b": 12}, size=32)
    path = write_recipe(tmp_path / "r.yaml", {"data": {"root": str(data), "val_fraction": 0.25}})
    extra = [*tiny(*DETERMINISTIC), f"logging.run_dir={tmp_path / 'runs'}", *overrides]
    return path, load_recipe(path, extra, command="finetune")


class Recorder(L.Callback):
    """The raw weights after every optimiser step (runs after EmaUpdate: added later)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.steps.append((trainer.global_step, trainer.current_epoch, state))


def test_the_average_follows_the_formula_and_validation_scores_both(tmp_path: Path) -> None:
    decay, every, start = 0.8, 2, 1
    _, recipe = recipe_for(
        tmp_path, f"ema={{decay: {decay}, every_n_steps: {every}, start_epoch: {start}}}"
    )
    L.seed_everything(0)
    assembly = build(recipe, "finetune")
    task = assembly.task
    initial = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    recorder = Recorder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*assembly.callbacks, recorder],
    )
    trainer.fit(task, datamodule=assembly.datamodule)
    # e <- w before `start` epoch; then e <- decay * e + (1 - decay) * w every `every` steps
    expected = initial
    for step, epoch, weights in recorder.steps:
        if epoch < start:
            expected = weights
        elif step % every == 0:
            expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    average = task.ema.module.state_dict()
    assert recorder.steps and len({s for s, _, _ in recorder.steps}) == len(recorder.steps)
    for key, value in expected.items():
        assert torch.allclose(average[key], value, atol=1e-6), key
    assert not torch.equal(average["head.weight"], task.model.state_dict()["head.weight"])

    # val/* scores the average, val_raw/* the trained weights, on the same images: accuracy
    # and the mean cross-entropy (continuous, so the two cannot agree by chance)
    task.eval()
    logits = {"ema": [], "raw": []}
    targets = []
    with torch.no_grad():
        for images, labels in assembly.datamodule.val_dataloader():
            logits["ema"].append(task.ema.module(images))
            logits["raw"].append(task.model(images))
            targets.append(labels)
    target = torch.cat(targets)
    direct = {}
    for name, parts in logits.items():
        joined = torch.cat(parts)  # [N, K]
        direct[name] = (
            float((joined.argmax(-1) == target).float().mean()),
            float(F.cross_entropy(joined, target)),
        )
    assert direct["ema"][1] != pytest.approx(direct["raw"][1])
    logged = trainer.callback_metrics
    assert float(logged["val/acc1"]) == pytest.approx(direct["ema"][0])
    assert float(logged["val/loss"]) == pytest.approx(direct["ema"][1], rel=1e-5)
    assert float(logged["val_raw/acc1"]) == pytest.approx(direct["raw"][0])
    assert float(logged["val_raw/loss"]) == pytest.approx(direct["raw"][1], rel=1e-5)
    # the test report scores the average too (here on the validation images)
    tested = trainer.test(task, dataloaders=assembly.datamodule.val_dataloader(), verbose=False)
    assert tested[0]["test/loss"] == pytest.approx(direct["ema"][1], rel=1e-5)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("method", ["none", "lora"])
def test_an_interrupted_ema_run_resumes_to_the_same_average_and_exports_it(
    tmp_path: Path, method: str
):
    ema = "ema={decay: 0.7, every_n_steps: 1, start_epoch: 0}"

    def train(*overrides: str) -> Path:
        # full-batch epochs: both runs see the same numbers in the same order (test_callbacks)
        fixed = ("data.batch_size=32", "optim.lr=1e-3", f"peft.method={method}")
        path, recipe = recipe_for(tmp_path, ema, *fixed, *overrides)
        return fit(recipe, "finetune", path, log=lambda _: None).run_dir

    straight = train("logging.name=straight", "trainer.max_epochs=3")
    train("logging.name=stopped", "trainer.max_epochs=2")
    resumed = train("logging.name=stopped", "trainer.max_epochs=3", "trainer.resume_from=auto")
    expected, got = final_state(straight), final_state(resumed)
    assert list(got) == list(expected)
    averaged = [k for k in expected if k.startswith("ema.module.")]
    assert averaged
    for key in expected:
        atol = 1e-5 if key.endswith("attn.qkv.bias") else 1e-7  # see tests/tasks/test_callbacks.py
        assert torch.allclose(got[key], expected[key], atol=atol), (
            key,
            (got[key] - expected[key]).abs().max(),
        )

    # the export is the best checkpoint's average (merged, for LoRA), not its raw weights
    best = next(p for p in (resumed / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    state = torch.load(best, weights_only=True)["state_dict"]
    exported = load_file(str(resumed / "model.safetensors"))
    assert torch.equal(exported["head.weight"], state["ema.module.head.weight"])
    assert not torch.equal(exported["head.weight"], state["model.head.weight"])
    if method == "none":
        for key, value in exported.items():
            assert torch.equal(value, state[f"ema.module.{key}"]), key
