"""Step 2, pseudo-labelling: the teacher labels the whole unlabelled set (averaging the clean
image and fixed test-time views), the confident predictions are selected (select.py) and written
to pseudo_labels.npz, with diagnostics of what was kept (precision and coverage per class, the
teacher's confidence histogram and calibration)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.data import ImageArrays
from pipeline.data.task import Task
from pipeline.engine.datamodule import Batches, ViewsFn
from pipeline.engine.predict import predict
from pipeline.errors import UserError
from pipeline.models.checkpoint import load_net
from pipeline.runtime import io
from pipeline.runtime.rundir import RunDir, Step
from pipeline.selftrain import noise
from pipeline.selftrain.select import PseudoLabels, per_class_stats, select_pseudo_labels
from pipeline.selftrain.teacher import data_augment

PSEUDO_LABELS = "pseudo_labels.npz"
DIAGNOSTICS = "pseudo_diagnostics.json"


def label_unlabelled(
    cfg: DictConfig, task: Task, teacher_ckpt: Path, step: Step
) -> tuple[PseudoLabels, dict[str, Any]]:
    """The teacher's pseudo-labels for the round in `step`, and their diagnostics (read back
    when a resumed run finds them written)."""
    run = step.run
    out, diagnostics_path = step / PSEUDO_LABELS, step / DIAGNOSTICS
    if run.exists(out, diagnostics_path):
        pseudo = read_pseudo_labels(out, len(task.unlabelled), task.num_classes)
        return pseudo, io.read_json(diagnostics_path)
    with run.timed("labelling"):
        teacher = load_net(cfg, teacher_ckpt, task.num_classes)
        pseudo, diagnostics = pseudo_label(
            cfg, cfg.data, teacher, task.unlabelled, out, run, task.unlabelled_truth()
        )
    run.write_json(diagnostics_path, diagnostics)
    return pseudo, diagnostics


def teacher_views(cfg: DictConfig, data_cfg: DictConfig) -> ViewsFn | None:
    """The fixed views the teacher averages over (pseudo_label.tta_views of data.augment's
    affine ranges); None without views or augmentation."""
    views = int(cfg.pseudo_label.get("tta_views", 0))
    augment = noise.from_config(data_augment(data_cfg))
    if not views or augment is None:
        return None
    return functools.partial(noise.fixed_views, views=views, augment=augment, seed=0)


def pseudo_label(
    cfg: DictConfig,
    data_cfg: DictConfig,
    net: torch.nn.Module,
    unlabelled: ImageArrays,
    out: Path,
    run: RunDir,
    truth: np.ndarray | None,
) -> tuple[PseudoLabels, dict[str, Any]]:
    """Label the unlabelled set, select, and write `out` (pseudo_labels.npz) atomically.
    Returns the kept pseudo-labels and their diagnostics (on every rank)."""
    views = teacher_views(cfg, data_cfg)
    predictions = predict(cfg, data_cfg, net, Batches(unlabelled.images), out.parent, views)
    num_classes = int(data_cfg.num_classes)

    def select_and_write() -> dict[str, Any]:
        index, probs = predictions
        pl = cfg.pseudo_label
        kept = select_pseudo_labels(
            torch.from_numpy(index),
            torch.from_numpy(probs),
            threshold=pl.threshold,
            max_per_class=pl.max_per_class,
            soft=pl.soft,
            temperature=pl.temperature,
        )
        io.write_npz(out, kept.arrays())
        diagnostics: dict[str, Any] = {"num_pseudo": len(kept)}
        diagnostics.update(per_class_stats(kept, truth, num_classes, len(unlabelled)))
        diagnostics.update(teacher_diagnostics(probs[np.argsort(index)], truth, num_classes))
        return diagnostics

    diagnostics = run.on_rank_zero(select_and_write)
    return read_pseudo_labels(out, len(unlabelled), num_classes), diagnostics


def teacher_diagnostics(
    probs: np.ndarray, truth: np.ndarray | None, num_classes: int
) -> dict[str, Any]:
    """Calibration of the teacher on the unlabelled set, and its confidence histogram."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    confidence = probs.max(1)
    counts, edges = np.histogram(confidence, bins=20, range=(0.0, 1.0))
    out: dict[str, Any] = {
        "confidence_hist": {"edges": edges.round(4).tolist(), "counts": counts.tolist()},
        "teacher_ece": None,
    }
    if truth is not None and (truth >= 0).any():
        known = truth >= 0
        out["teacher_ece"] = float(
            multiclass_calibration_error(
                torch.from_numpy(probs[known]),
                torch.from_numpy(truth[known]),
                num_classes=num_classes,
                n_bins=15,
            )
        )
    return out


def read_pseudo_labels(path: Path, num_unlabelled: int, num_classes: int) -> PseudoLabels:
    """pseudo_labels.npz, checked: indices in range and unique, labels in range."""
    z = io.read_npz(path)
    missing = {"index", "label", "confidence"} - set(z)
    if missing:
        raise UserError(f"{path} lacks arrays {sorted(missing)}; expected a pseudo_labels.npz")
    index, label = z["index"].astype(np.int64), z["label"].astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= num_unlabelled):
        raise UserError(
            f"{path} has indices outside the unlabelled set (size {num_unlabelled}); "
            "was it made for another dataset, labels_per_class or seed?"
        )
    if len(np.unique(index)) != len(index):
        raise UserError(f"{path} lists an unlabelled index more than once")
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}")
    return PseudoLabels(index, label, z["confidence"].astype(np.float32), z.get("probs"))
