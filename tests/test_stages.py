"""Every stage through the real CLI: the five-step loop on the bundled digits, and each step
alone on a tiny image folder the test writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from pipeline.runtime.io import load_checkpoint

SELFTRAIN = ["train.epochs=10", "train.min_steps=150", "selftrain.rounds=1"]
pytestmark = pytest.mark.slow  # every test here trains through the CLI


@pytest.fixture(scope="module")
def selftrain_run(tmp_path_factory):
    from conftest import FAST, run_cli

    run_dir = tmp_path_factory.mktemp("selftrain") / "run"
    proc = run_cli(*FAST, *SELFTRAIN, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_selftrain_artifact_layout(selftrain_run):
    run_dir, proc = selftrain_run
    names = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert names == [
        ".hydra/overrides.yaml",
        "config.yaml",
        "round_0/metrics.json",
        "round_0/model.ckpt",
        "round_1/metrics.json",
        "round_1/model.ckpt",
        "round_1/pseudo_diagnostics.json",
        "round_1/pseudo_labels.npz",
        "splits.npz",
        "summary.json",
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "selftrain" and summary["dataset"] == "digits"
    assert summary["num_labelled"] == 40  # 4 per class
    assert summary["num_labelled"] + summary["num_unlabelled"] + summary["num_test"] == 1797
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["final_test_accuracy"] == summary["rounds"][-1]["test_accuracy"]
    assert summary["rounds"][1]["num_pseudo"] > 0
    # the per-round table is printed
    assert "teacher" in proc.stdout and "student" in proc.stdout and "test acc" in proc.stdout


def test_student_beats_teacher_and_chance(selftrain_run):
    run_dir, _ = selftrain_run
    summary = json.loads((run_dir / "summary.json").read_text())
    teacher, student = (r["test_accuracy"] for r in summary["rounds"])
    assert teacher > 0.5  # 10 classes: chance is 0.1
    assert student > 0.5


def test_students_beat_their_teachers_over_seeds(tmp_path):
    """The claim of self-training, on three seeds of the real loop (not one lucky seed)."""
    from conftest import FAST, run_cli

    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m", "seed=0,1,2", *FAST, *SELFTRAIN, f"hydra.sweep.dir={sweep}",
        env={"OMP_NUM_THREADS": "1"}, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    gains = []
    for job in sorted(p for p in sweep.iterdir() if (p / "summary.json").exists()):
        rounds = json.loads((job / "summary.json").read_text())["rounds"]
        gains.append(rounds[-1]["test_accuracy"] - rounds[0]["test_accuracy"])
    assert len(gains) == 3
    assert all(g > 0 for g in gains), gains  # every student above its teacher
    assert sum(gains) / 3 > 0.02, gains  # by more than two points on average


def test_pseudo_labels_file(selftrain_run):
    run_dir, _ = selftrain_run
    summary = json.loads((run_dir / "summary.json").read_text())
    with np.load(run_dir / "round_1" / "pseudo_labels.npz", allow_pickle=False) as z:
        assert set(z.files) == {"index", "label", "confidence", "key"}
        index, label, conf = z["index"], z["label"], z["confidence"]
        # every sample is named by its key: digits/<its position in scikit-learn's digits>
        keys = z["key"]
        assert all(k.startswith("digits/") for k in keys) and len(set(keys)) == len(index)
    assert index.dtype == np.int64 and label.dtype == np.int64 and conf.dtype == np.float32
    assert len(np.unique(index)) == len(index)  # no duplicate pseudo-label index
    assert index.min() >= 0 and index.max() < summary["num_unlabelled"]
    assert (conf >= 0.8).all()  # the default threshold
    metrics = json.loads((run_dir / "round_1" / "metrics.json").read_text())
    assert metrics["num_pseudo"] == len(index)
    assert 0.5 < metrics["pseudo_accuracy"] <= 1.0
    assert len(metrics["per_class_coverage"]) == 10
    assert sum(metrics["confidence_hist"]["counts"]) == summary["num_unlabelled"]
    assert 0.0 <= metrics["teacher_ece"] <= 1.0


def test_splits_disjoint_and_saved(selftrain_run):
    run_dir, _ = selftrain_run
    with np.load(run_dir / "splits.npz", allow_pickle=False) as z:
        lab, unl = z["labelled"], z["unlabelled"]
    assert len(lab) == 40 and not set(lab) & set(unl)


def test_checkpoint_loads_weights_only(selftrain_run):
    run_dir, _ = selftrain_run
    ckpt = torch.load(run_dir / "round_1" / "model.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["name"] == "small_cnn"
    assert ckpt["hyper_parameters"]["num_classes"] == 10
    assert all(k.startswith("net.") for k in ckpt["state_dict"])


def test_rerun_same_command_redoes_nothing(selftrain_run):
    from conftest import FAST, run_cli

    run_dir, _ = selftrain_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli(*FAST, *SELFTRAIN, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


# --- each stand-alone step on a tiny image folder ------------------------------------------


def write_tree(root, classes=3, per_class=12, size=8, seed=0):
    """Class c is a bright square at a class-specific place: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            img = (torch.rand(1, size, size, generator=g) * 40).to(torch.uint8)
            img[:, 2 * c : 2 * c + 3, 1:7] = 220
            write_png(img, str(root / f"class{c}" / f"{i}.png"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_tree(root / "labelled", per_class=12, seed=1)
    write_tree(root / "test", per_class=5, seed=2)
    unl = root / "unlabelled"
    write_tree(unl / "nested", per_class=10, seed=3)  # class folders inside: labels unknown
    return root


def folder_args(root):
    return [
        "data=image_folder",
        f"data.labelled_dir={root / 'labelled'}",
        f"data.unlabelled_dir={root / 'unlabelled'}",
        f"data.test_dir={root / 'test'}",
        "data.num_classes=3",
        "data.image_size=8",
        "data.channels=1",
        "data.labels_per_class=4",
        "data.augment.randaugment_ops=0",
        "data.mean=[0.5]",
        "data.std=[0.5]",
        "train.batch_size=16",
    ]


def test_each_stage_alone(folders, tmp_path):
    from conftest import FAST, run_cli

    args = [*FAST, *folder_args(folders)]
    train_dir = tmp_path / "train"
    proc = run_cli(*args, "stage=train", f"run_dir={train_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = train_dir / "model.ckpt"
    assert load_checkpoint(ckpt)["hyper_parameters"]["num_classes"] == 3
    train_summary = json.loads((train_dir / "summary.json").read_text())
    assert train_summary["num_labelled"] == 12 and train_summary["num_test"] == 15
    # labelled tree: 12 per class, 4 labelled -> 8 left per class + 30 images of unlabelled_dir
    assert train_summary["num_unlabelled"] == 3 * 8 + 30

    out = tmp_path / "pl" / "labels.npz"
    proc = run_cli(
        *args,
        "stage=pseudolabel",
        f"ckpt={ckpt}",
        f"out={out}",
        "pseudo_label.threshold=0.0",
        "pseudo_label.soft=true",
        f"run_dir={tmp_path / 'pl'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out, allow_pickle=False) as z:
        assert z["index"].tolist() == list(range(54))  # threshold 0 keeps all, each once
        assert z["probs"].shape == (54, 3)
        np.testing.assert_allclose(z["probs"].sum(1), 1.0, rtol=1e-5)

    merge_dir = tmp_path / "merge"
    proc = run_cli(*args, "stage=merge", f"pseudo_in={out}", f"run_dir={merge_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(merge_dir / "train_set.npz", allow_pickle=False) as z:
        assert (z["source"] == 0).sum() == 12 and (z["source"] == 1).sum() == 54
        assert z["targets"].shape == (66, 3)

    student_dir = tmp_path / "student"
    proc = run_cli(*args, "stage=train", f"pseudo_in={out}", f"run_dir={student_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((student_dir / "metrics.json").read_text())["num_pseudo"] == 54

    eval_dir = tmp_path / "eval"
    proc = run_cli(
        *args, "stage=evaluate", f"ckpt={student_dir / 'model.ckpt'}", f"run_dir={eval_dir}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_test"] == 15 and metrics["test_accuracy"] > 1 / 3
