"""Step 1, the teacher: a network trained on the labelled set alone (engine/train.py trains
it, as it trains every network of the pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config.specs import RunSpec
from pipeline.data.task import Task
from pipeline.engine.train import train_labelled
from pipeline.runtime.rundir import Step


def train_teacher(
    cfg: RunSpec, task: Task, step: Step, seed: int, pretrained: Path | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the teacher on the labelled set and evaluate it on the test set."""
    return train_labelled(cfg, task, step, seed, pretrained, phase="teacher")
