"""The one way the pipeline trains a network (teachers, students, the supervised arm,
pretraining, fine-tuning): `train_model` builds a fresh network (or one started from pretrained
weights), trains it with the data's noise on a TrainingSet (and online on the pool with
consistency=...), saves it as the step's model.ckpt and evaluates it on the test set. A step
that already has its model.ckpt only evaluates it; an interrupted training resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.consistency import ConsistencySpec
from pipeline.data.arrays import ImageSet, subset
from pipeline.data.streamed import concat
from pipeline.data.task import Task
from pipeline.engine.augment import BatchAugment, from_config
from pipeline.engine.features import training_inputs
from pipeline.engine.fit import OnlinePool, evaluate, fit
from pipeline.engine.training_set import TrainingSet
from pipeline.errors import UserError
from pipeline.models.checkpoint import (
    build_net,
    finetune_setup,
    hparams_for,
    init_from_pretrained,
    load_net,
    model_checkpoint,
)
from pipeline.runtime.io import load_checkpoint
from pipeline.runtime.rundir import Step

log = logging.getLogger(__name__)

# What a training records about itself (FitResult.record) in model.ckpt and metrics.json.
TRAINING_RECORD = ("selected_by", "selected_epoch", "epochs", "train_images_per_s")


def train_labelled(
    cfg: RunSpec,
    task: Task,
    step: Step,
    seed: int,
    pretrained: Path | None = None,
    phase: str = "teacher",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on the labelled set alone (a teacher, the supervised arm, a fine-tuning) and
    evaluate on the test set."""
    labelled = TrainingSet.labelled_only(task.labelled.labels.numpy(), task.num_classes)
    return train_model(cfg, task, step, seed, labelled, pretrained, phase=phase)


def train_model(
    cfg: RunSpec,
    task: Task,
    step: Step,
    seed: int,
    train_set: TrainingSet,
    pretrained: Path | None = None,
    phase: str = "teacher",
    data: DataSpec | None = None,
    epochs: int | None = None,
    record: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a fresh network on `train_set` of `data` (default: cfg.data) for `epochs`
    (default: train.epochs), time counted as `phase`, evaluating the task's val set after every
    epoch; keep the weights train.select picks (the last epoch's, or the best on val: never
    chosen by test accuracy); save them as the step's model.ckpt (with `record` and the
    training's per-epoch record in its "pipeline" entry) and evaluate them on the val and test
    sets."""
    run = step.run
    data = cfg.data if data is None else data
    model_path = step / "model.ckpt"
    hparams = hparams_for(cfg, data, task.num_classes, task.bundle.classes)
    # A pretraining source without a val split keeps its last epoch (checks.py refuses
    # best_val without a val split on the data a stage trains on).
    select = str(cfg.train.select) if task.val is not None else "last"
    tracker = run.tracker
    steps = None
    if run.checkpoint_intact(model_path):  # trained before a kill (and intact): evaluate it
        net = load_net(cfg, model_path, task.num_classes, int(data.channels))
        trained = {k: v for k, v in (load_checkpoint(model_path).get("pipeline") or {}).items()
                   if k in TRAINING_RECORD}  # fmt: skip
        model, sets = net, task
    else:
        torch.manual_seed(seed)  # the init depends on the seed only, also when a run resumes
        net = build_net(cfg, task.num_classes)
        lr_scale, frozen, layer_decay = 1.0, [], None
        if pretrained is not None:
            init_from_pretrained(cfg, net, pretrained)
        if pretrained is not None or cfg.model.own_weights:
            lr_scale, frozen = finetune_setup(cfg, net)
            layer_decay = cfg.finetune.layer_decay
        with run.timed(phase):
            # model.cache_features: the head alone trains, on the sets' cached features.
            cached = training_inputs(
                cfg, data, net, task, run, phase, len(train_set) > train_set.num_labelled
            )
            model, sets = cached or (net, task)
            images = training_images(sets, train_set)
            augment = None if cached else from_config(data.augment)
            epochs = cfg.train.epochs if epochs is None else epochs
            result = fit(
                cfg, data, model, images, train_set, step.path, seed, epochs, hparams,
                augment, lr_scale, frozen, val=sets.val, select=select,
                loggers=tracker.lightning if tracker is not None else None,
                log_prefix=tracker.prefix(step.path) if tracker is not None else "",
                pool=online_pool(cfg.consistency, data, task, phase),
                layer_decay=layer_decay,
            )  # fmt: skip
            steps, trained = result.steps, result.record()
            checkpoint = model_checkpoint(net, hparams, {**(record or {"seed": seed}), **trained})
            run.save_checkpoint(model_path, checkpoint)
    with run.timed("evaluation"):
        metrics = evaluate(cfg, data, model, sets.test)
        if task.val is not None:
            metrics.update(evaluate(cfg, data, model, sets.val, split="val"))
            metrics["val_source"] = task.val_source
    metrics.update(trained)
    if steps is not None:
        metrics["train_steps"] = steps
    return net, metrics


def online_pool(spec: ConsistencySpec, data: DataSpec, task: Task, phase: str) -> OnlinePool | None:
    """The pool a training labels online (consistency=...): the task's unlabelled set, with
    the weak view (the data's shift and flip) and the strong one (the weak one plus
    RandAugment and cutout). None without a method, for pretraining (a labelled source), and
    for the students of selftrain when `consistency.students` is false."""
    if spec.method == "none" or phase == "pretraining":
        return None
    if phase == "students" and not spec.students:
        return None
    # Said, not refused: a user may want it (measured: docs/results.md). Once a run: by its
    # first training (the teacher, or the lone one), which every run with a method has.
    if task.open_set and phase != "students":
        log.warning(
            "consistency=%s learns from every pool image, the foreign ones of this open-set "
            "pool too, as if they were of the known classes (mnist5k, 6 known classes, a FixMatch "
            "teacher: 14%% of the merged pseudo-labels foreign, 0.2-1.4%% without); "
            "add consistency=none to keep them out",
            spec.method,
        )
    if len(task.unlabelled) == 0:
        raise UserError(
            f"consistency={spec.method} trains on the unlabelled pool, and this data has none: "
            "set data.labels_per_class (or data.unlabelled_dir), or consistency=none"
        )
    aug = data.augment or {}
    shift = {"translate": float(aug.get("translate", 0.125)), "flip": bool(aug.get("flip", False))}
    strong = BatchAugment(
        **shift,
        cutout=spec.cutout,
        randaugment_ops=spec.randaugment_ops,
        randaugment_magnitude=spec.randaugment_magnitude,
    )
    return OnlinePool(task.unlabelled, spec, BatchAugment(**shift), strong, task.unlabelled.labels)


def training_images(task: Task, train_set: TrainingSet) -> ImageSet:
    """The images of a TrainingSet, in its row order (labelled rows, then pseudo-labelled):
    one tensor when the sets are in memory, else read from disk as batches ask for them."""
    lab = train_set.source == 0
    return concat(
        [
            subset(task.labelled, train_set.position[lab]),
            subset(task.unlabelled, train_set.position[~lab]),
        ]
    )
