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

from pipeline.config.specs import RunSpec
from pipeline.data.task import Task, prepare_task
from pipeline.engine.summary import bad_images, summary
from pipeline.models.finetune import check_cache_features
from pipeline.runtime.rundir import RunDir
from pipeline.selftrain.label import label_unlabelled
from pipeline.selftrain.student import train_student
from pipeline.selftrain.teacher import train_teacher


def run_selftrain(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
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
        round_spec = cfg.for_round(k)  # the run's spec with `model` = this round's network
        pretrained = pretrained_for(cfg, round_spec, run) if cfg.init == "pretrained" else None
        metrics: dict[str, Any] = {
            "round": k,
            "model": str(round_spec.model.name),
            "num_pseudo": 0,
            "pseudo_accuracy": None,
        }
        if k == 0:
            _, test = train_teacher(round_spec, task, step, seed, pretrained)
        else:
            teacher = run / f"round_{k - 1}" / "model.ckpt"  # it names its own architecture
            pseudo, diagnostics = label_unlabelled(cfg, task, teacher, step)
            metrics.update(diagnostics)
            _, test = train_student(round_spec, task, step, seed, pseudo, pretrained)
        metrics.update(test)
        metrics.update(bad_images(task, metrics))
        metrics.update(open_set_metrics(task, metrics))
        metrics.update({"num_labelled": len(task.labelled), "num_unlabelled": len(task.unlabelled)})
        rounds.append(step.finish(metrics))
    return summary(cfg, run, "selftrain", task, rounds, start)


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


def pretrained_for(cfg: RunSpec, round_spec: RunSpec, run: RunDir) -> Path | None:
    """The pretrained weights a round of this architecture starts from (init=pretrained): the
    pretraining of `model` in run_dir/pretrain, of a student of another architecture in
    run_dir/pretrain_<its name> (each architecture is pretrained once, on the same source, and
    shared through pretrain.cache_dir like any pretraining)."""
    from pipeline.engine.pretrained import pretrained_checkpoint

    name = str(round_spec.model.name)
    step = "pretrain" if name == cfg.model.name else f"pretrain_{name}"
    return pretrained_checkpoint(round_spec, run, step)
