"""Self-training, the whole loop (`stage=selftrain`, the default):

1. train a teacher on the labelled set (round 0);
2. pseudo-label the unlabelled set with it;
3. select the confident pseudo-labels and merge them with the labelled set;
4. train a noised student on the merge and evaluate it on the test set;
5. iterate: the student is the next round's teacher.

Each round trains the network config/architecture.py names for it (round 0: `model`; round k:
`selftrain.student_models[k-1]` or `student_model`); a teacher is loaded as its checkpoint
names it, so a student may be larger than its teacher (Noisy Student). Each round is a step of the run dir (round_K/): a finished round is read back, never redone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.config.architecture import round_config
from pipeline.data.task import Task, prepare_task
from pipeline.models.finetune import check_cache_features
from pipeline.runtime.rundir import RunDir
from pipeline.selftrain.label import label_unlabelled
from pipeline.selftrain.student import train_student
from pipeline.selftrain.teacher import train_teacher


def run_selftrain(cfg: DictConfig, run: RunDir) -> dict[str, Any]:
    start = time.time()
    check_cache_features(cfg)  # (before anything trains: a refusal is exit 2 at once)
    with run.timed("data"):
        task = prepare_task(cfg.data, cfg.seed, run)
    rounds = []
    for k in range(cfg.selftrain.rounds + 1):
        step = run.step(f"round_{k}")
        if step.done:
            rounds.append(step.result())
            continue
        seed = cfg.seed * 1000 + k
        net_cfg = round_config(cfg, k)  # cfg with `model` = this round's network
        pretrained = pretrained_for(cfg, net_cfg, run) if cfg.init == "pretrained" else None
        metrics: dict[str, Any] = {
            "round": k,
            "model": str(net_cfg.model.name),
            "num_pseudo": 0,
            "pseudo_accuracy": None,
        }
        if k == 0:
            _, test = train_teacher(net_cfg, task, step, seed, pretrained)
        else:
            teacher = run / f"round_{k - 1}" / "model.ckpt"  # it names its own architecture
            pseudo, diagnostics = label_unlabelled(cfg, task, teacher, step)
            metrics.update(diagnostics)
            _, test = train_student(net_cfg, task, step, seed, pseudo, pretrained)
        metrics.update(test)
        metrics.update(bad_images(task, metrics))
        metrics.update(open_set_metrics(task, metrics))
        metrics.update({"num_labelled": len(task.labelled), "num_unlabelled": len(task.unlabelled)})
        rounds.append(step.finish(metrics))
    return summary(cfg, run, "selftrain", task, rounds, start)


BAD_IMAGE_COUNTS = ("num_bad_images", "num_bad_test_images", "num_bad_val_images")


def bad_images(task: Task, metrics: dict[str, Any]) -> dict[str, int]:
    """A round's `num_bad_images` (data.on_bad_image=skip; 0 when none): the unreadable images
    skipped while decoding the sets into memory, plus those a streamed set met in this round's
    pool labelling (the diagnostics' `num_bad_images`) and its test and val evaluation."""
    met = sum(int(metrics.get(k) or 0) for k in BAD_IMAGE_COUNTS)
    return {"num_bad_images": task.bundle.num_bad_images + met}


def open_set_metrics(task: Task, metrics: dict[str, Any]) -> dict[str, Any]:
    """An open-set pool's round metrics: `known_class_accuracy` (the test set holds the known
    classes only, so it is the test accuracy), and `merged_foreign_fraction` and `ood_auroc`
    of the round's selection (None for the teacher, which merged nothing)."""
    if not task.open_set:
        return {}
    return {
        "known_class_accuracy": metrics.get("test_accuracy"),
        "merged_foreign_fraction": metrics.get("merged_foreign_fraction"),
        "ood_auroc": metrics.get("ood_auroc"),
    }


def pretrained_for(cfg: DictConfig, net_cfg: DictConfig, run: RunDir) -> Path | None:
    """The pretrained weights a round of this architecture starts from (init=pretrained): the
    pretraining of `model` in run_dir/pretrain, of a student of another architecture in
    run_dir/pretrain_<its name> (each architecture is pretrained once, on the same source, and
    shared through pretrain.cache_dir like any pretraining)."""
    from pipeline.baseline.pretrain import pretrained_checkpoint

    name = str(net_cfg.model.name)
    step = "pretrain" if name == cfg.model.name else f"pretrain_{name}"
    return pretrained_checkpoint(net_cfg, run, step)


def summary(
    cfg: DictConfig,
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
