"""`vittune prepare-data` and training on its shards, through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_class_images, run_cli, subprocess_env
from helpers import ONE_THREAD, column, read_metrics, tiny, write_recipe

from vittune.data.prepare import prepare_data
from vittune.recipe.load import load_recipe

# Run by the test in place of the console script (and again by Lightning for the second DDP
# process): records which images each rank reads, then runs the real CLI.
PROBE = """
import os, sys
import torch.distributed as dist
from vittune.cli import main
from vittune.data import streaming

def record(kind, path):
    rank = dist.get_rank() if dist.is_initialized() else -1
    line = f"{rank}\\t{kind}\\t{path}\\n".encode()
    handle = os.open(os.environ["SEEN_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(handle, line)
    os.close(handle)

decode_item, shard_item = streaming.DecodeItem.__call__, streaming.ShardImages.__getitem__

def training_item(self, item):
    record("train", streaming._record(item)["path"])
    return decode_item(self, item)

def evaluation_item(self, index):
    record("eval", self.samples[index].path)
    return shard_item(self, index)

streaming.DecodeItem.__call__, streaming.ShardImages.__getitem__ = training_item, evaluation_item
sys.exit(main())
"""


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_prepare_data_then_finetune_on_the_shards_learns(tmp_path: Path) -> None:
    for split, count in (("train", 16), ("val", 5), ("test", 4)):
        make_class_images(tmp_path / "data" / split, dict.fromkeys("abc", count), seed=count)
    recipe = write_recipe(tmp_path / "r.yaml", {"data": {"root": "elsewhere", "num_workers": 2}})
    command = ["prepare-data", str(recipe), "shards", "--override", "data.root=data"]
    stdout = ok(run_cli(*command, cwd=tmp_path, env=ONE_THREAD))
    assert "images per split {'train': 48, 'val': 15, 'test': 12}" in stdout
    assert len(list((tmp_path / "shards" / "train").glob("chunk-*.bin"))) == 2  # 2 workers
    again = run_cli(*command, cwd=tmp_path, env=ONE_THREAD)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "vittune: error: shards exists and is not empty; pick a new output folder or remove it"
    )
    overrides = tiny(
        "data.format=litdata",
        "data.root=shards",
        "data.batch_size=8",
        "model.kwargs.global_pool=avg",
        "optim.lr=3e-3",
        "trainer.max_epochs=8",
        "logging.name=streamed",
    )
    stdout = ok(run_cli("finetune", str(recipe), *overrides, cwd=tmp_path, env=ONE_THREAD))
    assert "best val/acc1" in stdout
    run_dir = tmp_path / "runs" / "streamed"
    rows = read_metrics(run_dir)
    accuracy = column([r for r in rows if r.get("epoch")], "val/acc1")
    loss = column([r for r in rows if r.get("epoch")], "val/loss")
    assert len(accuracy) == 8 and max(accuracy) > 0.6, accuracy  # 3 classes: chance is 1/3
    assert loss[-1] < 0.7 * loss[0], loss
    # The test split was read from its shards too, and reported like any run's.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/acc1" in json.dumps(metrics)
    report = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    assert report["num_samples"] == 12 and report["split"] == "test"
    # The shards are the data now: evaluation, its figures included, needs no source file.
    (tmp_path / "data").rename(tmp_path / "moved")
    ok(run_cli("evaluate", str(run_dir), "--split", "val", cwd=tmp_path, env=ONE_THREAD))
    report = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())
    assert report["num_samples"] == 15
    assert report["overall"]["acc1"] < 1.0 and report["mistakes"]  # so the grid was drawn
    assert (run_dir / "eval" / "val" / "mistakes.png").is_file()


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_training_images_and_score_each_validation_image_once(
    tmp_path: Path,
) -> None:
    make_class_images(tmp_path / "data" / "train", {"a": 12, "b": 12})
    make_class_images(tmp_path / "data" / "val", {"a": 6, "b": 5}, seed=1)  # 11: 6 + 5
    data = {"root": str(tmp_path / "data"), "num_workers": 2, "batch_size": 4}
    recipe = write_recipe(tmp_path / "r.yaml", {"data": data})
    prepare_data(load_recipe(recipe), tmp_path / "shards", log=lambda line: None)  # 2 chunks
    (tmp_path / "probe.py").write_text(PROBE)
    overrides = tiny(
        "data.format=litdata",
        "data.root=shards",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "logging.name=ddp",
    )
    env = subprocess_env(**ONE_THREAD, SEEN_LOG=str(tmp_path / "seen.tsv"))
    result = subprocess.run(
        [sys.executable, "probe.py", "finetune", str(recipe), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    ok(result)
    seen: dict[tuple[str, int], list[str]] = {}
    for line in (tmp_path / "seen.tsv").read_text().splitlines():
        rank, kind, path = line.split("\t")
        seen.setdefault((kind, int(rank)), []).append(path)
    assert sorted(seen) == [("eval", 0), ("eval", 1), ("train", 0), ("train", 1)]
    train = {str(p.absolute()) for p in (tmp_path / "data" / "train").rglob("*.png")}
    val = {str(p.absolute()) for p in (tmp_path / "data" / "val").rglob("*.png")}
    # Training: litdata gives each rank its own chunks; together they are the split, once.
    rank0, rank1 = seen["train", 0], seen["train", 1]
    assert len(rank0) == len(rank1) == 12
    assert not set(rank0) & set(rank1) and set(rank0) | set(rank1) == train
    # Validation: every image read (and scored) exactly once, by one rank: 6 and 5, no padding.
    scored = Counter(seen["eval", 0] + seen["eval", 1])
    assert set(scored) == val and set(scored.values()) == {1}
    assert sorted([len(seen["eval", 0]), len(seen["eval", 1])]) == [5, 6]
    rows = read_metrics(tmp_path / "runs" / "ddp")
    assert len(column(rows, "val/acc1")) == 1
