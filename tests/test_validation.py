"""The val split: carved from the label budget (or data.val_dir), evaluated every epoch, and
what train.select=best_val chooses by; test accuracy chooses nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST, run_cli

from pipeline.data.splits import check_disjoint, make_splits

# Digits with a budget of 8 labels per class: 5 train + 3 val (30 val images).
VAL = ["data.labels_per_class=8", "data.val_per_class=3", "trainer.num_threads=1"]
TRAIN = [*FAST, *VAL, "stage=train", "train.epochs=6", "train.min_steps=60"]


def test_val_comes_out_of_the_label_budget():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [20, 25, 30, 35]))
    budget = make_splits(labels, 6, 0, seed=3, num_classes=4)
    split = make_splits(labels, 6, 2, seed=3, num_classes=4)
    assert np.bincount(labels[split.labelled]).tolist() == [4] * 4
    assert np.bincount(labels[split.val]).tolist() == [2] * 4
    check_disjoint(labelled=split.labelled, val=split.val, unlabelled=split.unlabelled)
    # the same labels are spent: labelled + val is the budget, the unlabelled pool unchanged
    assert np.array_equal(np.sort(np.r_[split.labelled, split.val]), budget.labelled)
    assert np.array_equal(split.unlabelled, budget.unlabelled)
    # and the labelled set is the one of a 4-label run without val (comparable runs)
    assert np.array_equal(split.labelled, make_splits(labels, 4, 0, 3, 4).labelled)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same training twice, keeping the best-val epoch and the last one."""
    root = tmp_path_factory.mktemp("validation")
    runs = {}
    for select in ("best_val", "last"):
        run_dir = root / select
        proc = run_cli(*TRAIN, f"train.select={select}", f"run_dir={run_dir}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[select] = (
            json.loads((run_dir / "metrics.json").read_text()),
            json.loads((run_dir / "summary.json").read_text()),
            run_dir,
        )
    return runs


@pytest.mark.slow  # trains through the CLI
def test_val_is_evaluated_every_epoch_and_kept_apart(trained):
    metrics, summary, run_dir = trained["best_val"]
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(6))
    assert all(0.0 <= e["val_accuracy"] <= 1.0 and e["train_loss"] > 0 for e in metrics["epochs"])
    assert metrics["num_val"] == summary["num_val"] == 30
    assert summary["num_labelled"] == 50 and summary["val_source"] == "val_per_class"
    with np.load(run_dir / "splits.npz") as z:
        assert len(z["val"]) == 30 and len(z["labelled"]) == 50
        check_disjoint(labelled=z["labelled"], val=z["val"], unlabelled=z["unlabelled"])


@pytest.mark.slow  # trains through the CLI
def test_best_val_keeps_the_epoch_with_the_best_val_accuracy(trained):
    metrics, summary, _ = trained["best_val"]
    accs = [e["val_accuracy"] for e in metrics["epochs"]]
    best = int(np.argmax(accs))  # the first of equal ones: a later epoch must be better
    assert metrics["selected_by"] == "val" and metrics["selected_epoch"] == best
    # the kept weights, evaluated again on the val split, score what that epoch scored
    assert metrics["val_accuracy"] == pytest.approx(accs[best], abs=1e-6)
    assert summary["val_accuracy"] == metrics["val_accuracy"]
    assert summary["selected_by"] == "val" and summary["rounds"][0]["selected_by"] == "val"


@pytest.mark.slow  # trains through the CLI
def test_last_keeps_the_last_epoch_and_training_is_the_same(trained):
    best_metrics, _, _ = trained["best_val"]
    metrics, summary, _ = trained["last"]
    accs = [e["val_accuracy"] for e in metrics["epochs"]]
    assert metrics["selected_by"] == "last" and metrics["selected_epoch"] == 5
    assert metrics["val_accuracy"] == pytest.approx(accs[-1], abs=1e-6)
    assert summary["selected_by"] == "last"
    # selection changes which weights are kept, not the training
    assert accs == pytest.approx([e["val_accuracy"] for e in best_metrics["epochs"]], abs=1e-6)
    if max(accs) > accs[-1]:
        assert best_metrics["val_accuracy"] > metrics["val_accuracy"]


@pytest.mark.slow  # trains through the CLI
def test_val_dir_is_the_val_set(tmp_path):
    from test_stages import folder_args, write_tree

    write_tree(tmp_path / "labelled", per_class=8, seed=1)
    write_tree(tmp_path / "test", per_class=3, seed=2)
    write_tree(tmp_path / "val", per_class=2, seed=4)
    (tmp_path / "unlabelled").mkdir()
    write_tree(tmp_path / "unlabelled" / "x", per_class=4, seed=3)
    run_dir = tmp_path / "run"
    proc = run_cli(
        *FAST,
        *folder_args(tmp_path),
        f"data.val_dir={tmp_path / 'val'}",
        "stage=train",
        "train.epochs=2",
        "train.min_steps=10",
        "train.select=best_val",
        f"run_dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_source"] == "val_dir" and summary["num_val"] == 6
    assert summary["num_labelled"] == 12  # the label budget is untouched by a val folder
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["selected_by"] == "val"


def test_val_dir_and_val_per_class_together_are_refused(tmp_path):
    proc = run_cli(
        "data=image_folder",
        "data.num_classes=3",
        f"data.labelled_dir={tmp_path}",
        f"data.val_dir={tmp_path}",
        "data.labels_per_class=4",
        "data.val_per_class=1",
        f"run_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: data.val_dir and data.val_per_class both give a val set; pass one of them "
        "(data.val_per_class=0 to use the folder)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two DDP processes on the CPU
def test_val_rows_are_split_across_ddp_ranks_once_each(tmp_path):
    run_dir = tmp_path / "ddp"
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "logger=csv", "train.select=best_val"]
    proc = run_cli(*TRAIN, *ddp, "train.epochs=3", "train.min_steps=30", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_val"] == 30  # every val image counted once (evaluate checks the count)
    accs = [e["val_accuracy"] for e in metrics["epochs"]]
    assert metrics["selected_epoch"] == int(np.argmax(accs))
    assert metrics["val_accuracy"] == pytest.approx(max(accs), abs=1e-6)
    # one logger, on rank 0: each epoch logged once
    csv = (run_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    assert len(csv) == 1 + 3 + 1  # header, 3 epochs, the round
