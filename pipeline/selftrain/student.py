"""Step 4, the student: a fresh network trained, with noise, on the labelled set merged with the
kept pseudo-labels (each batch keeps `pseudo_label.labelled_fraction` true labels), then
evaluated on the test set. The noise is the data's augmentation and the network's dropout and
stochastic depth (pipeline/engine/augment.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config.specs import RunSpec
from pipeline.data.task import Task
from pipeline.engine.train import train_model
from pipeline.engine.training_set import TrainingSet
from pipeline.runtime.rundir import Step
from pipeline.selftrain.merge import merge_labelled_and_pseudo
from pipeline.selftrain.select import PseudoLabels, balance_target


def train_student(
    cfg: RunSpec,
    task: Task,
    step: Step,
    seed: int,
    pseudo: PseudoLabels | None,
    pretrained: Path | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Merge the labelled set with the pseudo-labels, train a student on it, evaluate it."""
    train_set = student_training_set(cfg, task, pseudo)
    return train_model(cfg, task, step, seed, train_set, pretrained, phase="students")


def duplicate_target(cfg: RunSpec, pseudo: PseudoLabels | None) -> int | None:
    """K up to which the classes' pseudo-labels are duplicated (pseudo_label.balance=duplicate;
    K = pseudo_label.max_per_class, or the median class count); None: no duplication."""
    if cfg.pseudo_label.balance != "duplicate" or pseudo is None:
        return None
    return balance_target(pseudo.label, cfg.pseudo_label.max_per_class)


def student_training_set(cfg: RunSpec, task: Task, pseudo: PseudoLabels | None) -> TrainingSet:
    """The labelled set merged with the kept pseudo-labels (balanced as configured)."""
    return merge_labelled_and_pseudo(
        task.labelled.labels.numpy(),
        pseudo,
        task.num_classes,
        cfg.pseudo_label.weight,
        duplicate_to=duplicate_target(cfg, pseudo),
    )
