"""Supervised pretraining on a labelled source set (`stage=pretrain`); the pretraining
itself, its cache and the weights a run starts from are engine/pretrained.py's."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config.specs import RunSpec
from pipeline.engine.pretrained import pretrain
from pipeline.runtime.rundir import RunDir


def run_pretrain(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Supervised training on every label of the source set (pretrain_data); evaluated on the
    source's own test split."""
    start = time.time()
    metrics = pretrain(cfg, run.step())
    return {
        "stage": "pretrain",
        "dataset": str(cfg.pretrain_data.name),
        "target_dataset": str(cfg.data.name),
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "num_labelled": metrics["num_labelled"],
        "num_unlabelled": 0,
        "num_test": metrics["num_test"],
        "rounds": [{"round": 0, "test_accuracy": metrics["test_accuracy"], "num_pseudo": 0}],
        "final_test_accuracy": metrics["test_accuracy"],  # on the source's test split
        "source_test_accuracy": metrics["test_accuracy"],
        "val_accuracy": metrics.get("val_accuracy"),  # on the source's val split, if it has one
        "selected_by": metrics.get("selected_by", "last"),
        "wall_time_s": round(time.time() - start, 2),
    }
