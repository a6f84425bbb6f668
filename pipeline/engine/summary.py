"""summary.json, the one builder for every stage that trains or evaluates (selftrain, train,
finetune, baseline, evaluate), and each round's count of skipped images."""

from __future__ import annotations

import time
from typing import Any

from pipeline.config.specs import RunSpec
from pipeline.data.task import Task
from pipeline.runtime.rundir import RunDir

BAD_IMAGE_COUNTS = ("num_bad_images", "num_bad_test_images", "num_bad_val_images")


def bad_images(task: Task, metrics: dict[str, Any]) -> dict[str, int]:
    """A round's `num_bad_images` (data.on_bad_image=skip; 0 when none): the unreadable images
    skipped while decoding the sets into memory, plus those a streamed set met in this round's
    pool labelling (the diagnostics' `num_bad_images`) and its test and val evaluation."""
    met = sum(int(metrics.get(k) or 0) for k in BAD_IMAGE_COUNTS)
    return {"num_bad_images": task.bundle.num_bad_images + met}


def summary(
    cfg: RunSpec,
    run: RunDir,
    stage: str,
    task: Task,
    rounds: list[dict],
    start: float,
    **extra: Any,
) -> dict[str, Any]:
    """summary.json: the run's result in the design contract's shape. `val_accuracy` is the
    final round's accuracy on the val split (None without one): what a sweep's objective
    reads; `selected_by` says which split chose each round's weights ("val" or "last": never
    the test split)."""
    keep = (
        "round",
        "model",
        "test_accuracy",
        "balanced_accuracy",
        "per_class_recall",
        "known_class_accuracy",
        "merged_foreign_fraction",
        "ood_auroc",
        "val_accuracy",
        "selected_by",
        "num_pseudo",
        "pseudo_accuracy",
        "per_class_coverage",
        "num_bad_images",
    )
    return {
        "stage": stage,
        "dataset": str(cfg.data.name),
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "num_labelled": len(task.labelled),
        "num_unlabelled": len(task.unlabelled),
        "num_test": len(task.test),
        "rounds": [{k: r.get(k) for k in keep if k in r} for r in rounds],
        "final_test_accuracy": rounds[-1]["test_accuracy"],
        "final_balanced_accuracy": rounds[-1].get("balanced_accuracy"),
        "teacher_test_accuracy": rounds[0]["test_accuracy"],
        "val_accuracy": rounds[-1].get("val_accuracy"),
        "num_val": len(task.val) if task.val is not None else 0,
        "val_source": task.val_source,
        "selected_by": rounds[-1].get("selected_by", "last"),
        # Every round reads the sets of the rounds before it (round 1 on adds the pool): the
        # largest count is the run's, each skipped image once.
        "num_bad_images": max(
            [int(r.get("num_bad_images") or 0) for r in rounds] + [task.bundle.num_bad_images]
        ),
        "wall_time_s": round(time.time() - start, 2),
        # CPU seconds of this rank's process (all threads): unlike the wall time, it does not
        # grow when other jobs share the machine's cores
        "cpu_time_s": round(time.process_time() - run.cpu_start, 1),
        "phase_seconds": {k: round(v, 2) for k, v in run.phases.items()},
        **extra,
    }
