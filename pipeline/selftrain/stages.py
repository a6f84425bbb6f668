"""The steps of self-training as stages of their own (`stage=train|pseudolabel|merge|evaluate`),
so that a cluster can run each as a separate job on the artifacts of the others."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config.specs import RunSpec
from pipeline.data.task import prepare_task
from pipeline.engine.fit import evaluate
from pipeline.engine.summary import bad_images, summary
from pipeline.errors import UserError
from pipeline.models.checkpoint import checkpoint_model_name, load_net
from pipeline.models.finetune import check_cache_features
from pipeline.runtime.rundir import RunDir
from pipeline.selftrain.label import label_shards, pseudo_label, read_pseudo_labels, shards_done
from pipeline.selftrain.student import student_training_set, train_student
from pipeline.selftrain.teacher import train_teacher


def run_train(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Train one model on the labelled split (plus `pseudo_in` pseudo-labels if given), evaluate."""
    start = time.time()
    check_cache_features(cfg)
    task = prepare_task(cfg.data, cfg.seed, run)
    pretrained = None
    if cfg.init == "pretrained":
        from pipeline.engine.pretrained import pretrained_checkpoint

        pretrained = pretrained_checkpoint(cfg, run)
    step, seed = run.step(), cfg.seed * 1000
    if cfg.pseudo_in:
        pseudo = read_pseudo_labels(Path(cfg.pseudo_in), len(task.unlabelled), task.num_classes)
        _, metrics = train_student(cfg, task, step, seed, pseudo, pretrained)
    else:
        pseudo = None
        _, metrics = train_teacher(cfg, task, step, seed, pretrained)
    metrics.update({"round": 0, "num_pseudo": len(pseudo) if pseudo is not None else 0})
    metrics.update(bad_images(task, metrics))
    return summary(cfg, run, "train", task, [step.finish(metrics)], start)


def run_pseudolabel(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Label the configured unlabelled set with any checkpoint and write `out` (.npz); with
    `pseudo_label.shard=I`, label only shard I (one job of an array) into `out`'s shard folder:
    the run without `shard` then selects over all the shard files."""
    task = prepare_task(cfg.data, cfg.seed, run)
    out = Path(cfg.out) if cfg.out else run / "pseudo_labels.npz"
    if out.suffix != ".npz":
        raise UserError(f"out={out} must end in .npz")
    net = load_net(cfg, cfg.ckpt, task.num_classes)
    shard = cfg.pseudo_label.shard
    if shard is not None:
        shard_dir = out.with_suffix(".shards")
        plan = label_shards(cfg, cfg.data, net, task.unlabelled, shard_dir, run, only=int(shard))
        done = shards_done(shard_dir, plan)
        return {
            "stage": "pseudolabel",
            "shard": int(shard),
            "num_shards": plan.num_shards,
            "shards_done": done,
            "shards_dir": str(shard_dir),
            "num_unlabelled": len(task.unlabelled),
        }
    pseudo, diagnostics = pseudo_label(
        cfg, cfg.data, net, task.unlabelled, out, run, task.unlabelled_truth(), task
    )
    return {
        "stage": "pseudolabel",
        "model": checkpoint_model_name(cfg.ckpt) or str(cfg.model.name),
        "out": str(out),
        "num_pseudo": len(pseudo),
        "num_unlabelled": len(task.unlabelled),
        "pseudo_accuracy": diagnostics["pseudo_accuracy"],
        # skipped decoding the pool into memory, or met labelling it as it streamed
        "num_bad_images": task.bundle.num_bad_images + diagnostics.get("num_bad_images", 0),
    }


def run_merge(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Merge the labelled split with `pseudo_in`; write run_dir/train_set.npz (what a student
    trains on: source 0/1 = labelled/unlabelled set, position in it, target, weight)."""
    if not cfg.pseudo_in:
        raise UserError("stage=merge needs pseudo_in=PATH/pseudo_labels.npz")
    task = prepare_task(cfg.data, cfg.seed, run)
    pseudo = read_pseudo_labels(Path(cfg.pseudo_in), len(task.unlabelled), task.num_classes)
    merged = student_training_set(cfg, task, pseudo)
    run.write_npz(run / "train_set.npz", merged.arrays())
    return {
        "stage": "merge",
        "num_labelled": merged.num_labelled,
        "num_pseudo": len(pseudo),
        "num_rows": len(merged),
    }


def run_evaluate(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Test accuracy of any checkpoint on the configured test set; writes run_dir/metrics.json."""
    task = prepare_task(cfg.data, cfg.seed, None)
    net = load_net(cfg, cfg.ckpt, task.num_classes)
    metrics = evaluate(cfg, cfg.data, net, task.test)
    metrics.update(bad_images(task, metrics))
    model = checkpoint_model_name(cfg.ckpt) or str(cfg.model.name)
    metrics.update({"ckpt": str(cfg.ckpt), "model": model, "dataset": str(cfg.data.name)})
    run.step().finish(metrics)
    return {"stage": "evaluate", **metrics}
