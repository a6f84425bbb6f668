"""The stages: each is a recipe `run_<stage>(cfg, run_dir) -> summary` over the steps.

A finished piece of work is recognised by its artifact (round_k/metrics.json, model.ckpt,
pseudo_labels.npz, summary.json) and never redone, so re-running a killed command resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from pipeline import dist
from pipeline.artifacts import atomic_path, read_json, write_json
from pipeline.config import pretrain_key
from pipeline.errors import UserError
from pipeline.selection import merge_labelled_and_pseudo, per_class_stats
from pipeline.steps import (
    Task,
    build_net,
    evaluate,
    finetune_setup,
    fit,
    hparams_for,
    init_from_pretrained,
    load_net,
    prepare_task,
    pseudo_label,
    read_pseudo_labels,
    save_model,
    training_images,
)

log = logging.getLogger("pipeline")
DONE = "metrics.json"  # the last file a round writes: its presence means the round is finished
PHASE_SECONDS: dict[str, float] = defaultdict(float)  # where this process's time went


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        PHASE_SECONDS[phase] += time.perf_counter() - start


def write_rank_zero(path: Path, data: Any) -> None:
    if dist.is_rank_zero():
        write_json(path, data)
    dist.barrier()


def teacher_diagnostics(probs: np.ndarray, task: Task, num_classes: int) -> dict[str, Any]:
    """Calibration of the teacher on the unlabelled set, and its confidence histogram."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    confidence = probs.max(1)
    counts, edges = np.histogram(confidence, bins=20, range=(0.0, 1.0))
    out: dict[str, Any] = {
        "confidence_hist": {"edges": edges.round(4).tolist(), "counts": counts.tolist()},
        "teacher_ece": None,
    }
    truth = task.unlabelled.labels
    if truth is not None and (truth >= 0).any():
        known = (truth >= 0).numpy()
        out["teacher_ece"] = float(
            multiclass_calibration_error(
                torch.from_numpy(probs[known]), truth[known], num_classes=num_classes, n_bins=15
            )
        )
    return out


def train_round(
    cfg: DictConfig,
    task: Task,
    round_dir: Path,
    seed: int,
    pseudo=None,
    pretrained: Path | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Steps 3-4: merge, train a fresh model (teacher or noised student), evaluate it."""
    train_set = merge_labelled_and_pseudo(
        task.labelled.labels.numpy(), pseudo, task.num_classes, cfg.pseudo_label.weight
    )
    hparams = hparams_for(cfg, cfg.data, task.num_classes)
    model_path = round_dir / "model.ckpt"
    if model_path.exists():
        net = load_net(cfg, model_path, task.num_classes)
    else:
        torch.manual_seed(seed)  # the init depends on the seed only, also when a run resumes
        net = build_net(cfg, task.num_classes)
        lr_scale, frozen = 1.0, []
        if pretrained is not None:
            init_from_pretrained(cfg, net, pretrained)
        if pretrained is not None or cfg.model.get("weights"):
            lr_scale, frozen = finetune_setup(cfg, net)
        with timed("teacher" if pseudo is None else "students"):
            images = training_images(task, train_set)
            fit(cfg, cfg.data, net, images, train_set, round_dir, seed, cfg.train.epochs,
                hparams, lr_scale, frozen)  # fmt: skip
            save_model(model_path, net, hparams, {"seed": seed})
    with timed("evaluation"):
        metrics = evaluate(cfg, cfg.data, net, task.test)
    return net, metrics


def run_selftrain(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The five steps: teacher; then per round pseudo-label, select, merge, train a student,
    evaluate; the student becomes the next teacher."""
    start = time.time()
    with timed("data"):
        task = prepare_task(cfg.data, cfg.seed, run_dir)
    pretrained = pretrained_checkpoint(cfg, run_dir) if cfg.init == "pretrained" else None
    rounds = []
    for k in range(cfg.selftrain.rounds + 1):
        round_dir = run_dir / f"round_{k}"
        if (round_dir / DONE).exists():
            rounds.append(read_json(round_dir / DONE))
            remove_resume_state(round_dir)  # a kill right after metrics.json may have left it
            continue
        metrics: dict[str, Any] = {"round": k, "num_pseudo": 0, "pseudo_accuracy": None}
        pseudo = None
        if k > 0:
            pseudo, diagnostics = label_round(
                cfg, task, run_dir / f"round_{k - 1}" / "model.ckpt", round_dir
            )
            metrics.update(diagnostics)
        _, test = train_round(cfg, task, round_dir, cfg.seed * 1000 + k, pseudo, pretrained)
        metrics.update(test)
        metrics.update({"num_labelled": len(task.labelled), "num_unlabelled": len(task.unlabelled)})
        write_rank_zero(round_dir / DONE, metrics)
        rounds.append(metrics)
        remove_resume_state(round_dir)
    return summary(cfg, "selftrain", task, rounds, start)


def label_round(
    cfg: DictConfig, task: Task, teacher_ckpt: Path, round_dir: Path
) -> tuple[Any, dict]:
    """Steps 2-3 of a round: the teacher labels the unlabelled set; selection; diagnostics."""
    out = round_dir / "pseudo_labels.npz"
    diag_path = round_dir / "pseudo_diagnostics.json"
    if out.exists() and diag_path.exists():
        pseudo = read_pseudo_labels(out, len(task.unlabelled), task.num_classes)
        return pseudo, read_json(diag_path)
    with timed("labelling"):
        teacher = load_net(cfg, teacher_ckpt, task.num_classes)
        pseudo, probs = pseudo_label(cfg, cfg.data, teacher, task.unlabelled, out)
    diagnostics: dict[str, Any] = {}
    if dist.is_rank_zero():
        truth = task.unlabelled.labels.numpy() if task.unlabelled.labels is not None else None
        diagnostics = {"num_pseudo": len(pseudo)}
        diagnostics.update(per_class_stats(pseudo, truth, task.num_classes, len(task.unlabelled)))
        diagnostics.update(teacher_diagnostics(probs, task, task.num_classes))
    write_rank_zero(diag_path, diagnostics)
    return pseudo, read_json(diag_path)


def remove_resume_state(round_dir: Path) -> None:
    """After a round is finished its last.ckpt is only a copy of model.ckpt plus optimizer, and
    prediction shards a killed labelling pass left are stale."""
    if dist.is_rank_zero():
        for leftover in ("checkpoints", "predict_shards"):
            shutil.rmtree(round_dir / leftover, ignore_errors=True)
    dist.barrier()


def summary(
    cfg: DictConfig, stage: str, task: Task, rounds: list[dict], start: float, **extra: Any
) -> dict[str, Any]:
    keep = ("round", "test_accuracy", "num_pseudo", "pseudo_accuracy", "per_class_coverage")
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
        "teacher_test_accuracy": rounds[0]["test_accuracy"],
        "wall_time_s": round(time.time() - start, 2),
        "phase_seconds": {k: round(v, 2) for k, v in PHASE_SECONDS.items()},
        **extra,
    }


# --- the stand-alone steps ------------------------------------------------------------------


def run_train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one model on the labelled split (plus `pseudo_in` pseudo-labels if given), evaluate."""
    start = time.time()
    task = prepare_task(cfg.data, cfg.seed, run_dir)
    pseudo = None
    if cfg.pseudo_in:
        pseudo = read_pseudo_labels(Path(cfg.pseudo_in), len(task.unlabelled), task.num_classes)
    pretrained = pretrained_checkpoint(cfg, run_dir) if cfg.init == "pretrained" else None
    _, metrics = train_round(cfg, task, run_dir, cfg.seed * 1000, pseudo, pretrained)
    metrics.update({"round": 0, "num_pseudo": len(pseudo) if pseudo is not None else 0})
    write_rank_zero(run_dir / DONE, metrics)
    remove_resume_state(run_dir)
    return summary(cfg, "train", task, [metrics], start)


def run_pseudolabel(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Label the configured unlabelled set with any checkpoint; write `out` (.npz)."""
    task = prepare_task(cfg.data, cfg.seed, run_dir)
    out = Path(cfg.out) if cfg.out else run_dir / "pseudo_labels.npz"
    if out.suffix != ".npz":
        raise UserError(f"out={out} must end in .npz")
    net = load_net(cfg, cfg.ckpt, task.num_classes)
    pseudo, _ = pseudo_label(cfg, cfg.data, net, task.unlabelled, out)
    truth = task.unlabelled.labels.numpy() if task.unlabelled.labels is not None else None
    stats = per_class_stats(pseudo, truth, task.num_classes, len(task.unlabelled))
    result = {
        "stage": "pseudolabel",
        "out": str(out),
        "num_pseudo": len(pseudo),
        "num_unlabelled": len(task.unlabelled),
        "pseudo_accuracy": stats["pseudo_accuracy"],
    }
    return result


def run_merge(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Merge the labelled split with `pseudo_in`; write run_dir/train_set.npz (what a student
    trains on: source 0/1 = labelled/unlabelled set, position in it, target, weight)."""
    if not cfg.pseudo_in:
        raise UserError("stage=merge needs pseudo_in=PATH/pseudo_labels.npz")
    task = prepare_task(cfg.data, cfg.seed, run_dir)
    pseudo = read_pseudo_labels(Path(cfg.pseudo_in), len(task.unlabelled), task.num_classes)
    merged = merge_labelled_and_pseudo(
        task.labelled.labels.numpy(), pseudo, task.num_classes, cfg.pseudo_label.weight
    )
    if dist.is_rank_zero():
        from pipeline.artifacts import write_npz

        write_npz(
            run_dir / "train_set.npz",
            {
                "source": merged.source,
                "position": merged.position,
                "targets": merged.targets,
                "weight": merged.weight,
            },
        )
    dist.barrier()
    return {
        "stage": "merge",
        "num_labelled": merged.num_labelled,
        "num_pseudo": len(pseudo),
        "num_rows": len(merged),
    }


def run_evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Test accuracy of any checkpoint on the configured test set; writes run_dir/metrics.json."""
    task = prepare_task(cfg.data, cfg.seed, None)
    net = load_net(cfg, cfg.ckpt, task.num_classes)
    metrics = evaluate(cfg, cfg.data, net, task.test)
    metrics.update({"ckpt": str(cfg.ckpt), "dataset": str(cfg.data.name)})
    write_rank_zero(run_dir / DONE, metrics)
    return {"stage": "evaluate", **metrics}


# --- pretraining baseline (Zoph et al. 2020) -------------------------------------------------


def pretrained_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The pretrained weights this run starts from: pretrain.ckpt, torchvision weights (None:
    the network loads them itself), or a pretraining run inside run_dir/pretrain."""
    if cfg.pretrain.ckpt:
        return Path(cfg.pretrain.ckpt)
    if cfg.model.get("weights"):
        return None
    pretrain_dir = run_dir / "pretrain"
    if not (pretrain_dir / DONE).exists() and not take_cached_pretraining(cfg, pretrain_dir):
        run_pretrain(cfg, pretrain_dir)
        share_pretraining(cfg, pretrain_dir)
    remove_resume_state(pretrain_dir)  # a kill right after its metrics.json may have left it
    return pretrain_dir / "model.ckpt"


PRETRAIN_FILES = ("model.ckpt", DONE)  # metrics.json last: its presence marks a complete copy


def copy_pretraining(src: Path, dst: Path) -> None:
    """Rank 0 copies a finished pretraining, each file atomically, metrics.json last; every rank
    waits for it."""
    if dist.is_rank_zero():
        for name in PRETRAIN_FILES:
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
    dist.barrier()


def take_cached_pretraining(cfg: DictConfig, pretrain_dir: Path) -> bool:
    """Copy a finished pretraining with the same settings from pretrain.cache_dir, if there is
    one (a sweep's jobs then pretrain once per seed instead of once per job)."""
    if not cfg.pretrain.cache_dir:
        return False
    cached = Path(cfg.pretrain.cache_dir) / pretrain_key(cfg)
    # Rank 0 decides, so that every rank of a DDP job takes the same branch.
    found = bool(dist.broadcast_object((cached / DONE).exists() if dist.is_rank_zero() else None))
    if found:
        copy_pretraining(cached, pretrain_dir)
        log.info("pretrained weights %s taken from pretrain.cache_dir", cached.name)
    return found


def share_pretraining(cfg: DictConfig, pretrain_dir: Path) -> None:
    """Publish a finished pretraining into pretrain.cache_dir. Atomic renames, no locks: jobs
    that pretrain the same thing at the same time only duplicate work."""
    if cfg.pretrain.cache_dir:  # the same on every rank
        copy_pretraining(pretrain_dir, Path(cfg.pretrain.cache_dir) / pretrain_key(cfg))


def run_pretrain(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Supervised training on every label of the source set (pretrain_data); evaluated on the
    source's own test split."""
    start = time.time()
    src = cfg.pretrain_data
    task = prepare_task(src, cfg.seed, None)
    finished = (run_dir / DONE).exists()  # read once: rank 0 writes it below (DDP)
    if finished:
        metrics = read_json(run_dir / DONE)
    elif (run_dir / "model.ckpt").exists():  # killed after training, before metrics.json
        net = load_net(cfg, run_dir / "model.ckpt", task.num_classes)
        metrics = evaluate(cfg, src, net, task.test)
    else:
        train_set = merge_labelled_and_pseudo(task.labelled.labels.numpy(), None, task.num_classes)
        hparams = hparams_for(cfg, src, task.num_classes)
        torch.manual_seed(cfg.seed + 7919)
        net = build_net(cfg, task.num_classes)
        fit(
            cfg,
            src,
            net,
            task.labelled.images,
            train_set,
            run_dir,
            cfg.seed + 7919,
            cfg.pretrain.epochs,
            hparams,
        )
        save_model(run_dir / "model.ckpt", net, hparams, {"pretrain_source": str(src.name)})
        metrics = evaluate(cfg, src, net, task.test)
    if not finished:
        metrics.update({"round": 0, "source": str(src.name), "num_labelled": len(task.labelled)})
        write_rank_zero(run_dir / DONE, metrics)
        remove_resume_state(run_dir)
    return {
        "stage": "pretrain",
        "dataset": str(src.name),
        "target_dataset": str(cfg.data.name),
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "num_labelled": len(task.labelled),
        "num_unlabelled": 0,
        "num_test": len(task.test),
        "rounds": [{"round": 0, "test_accuracy": metrics["test_accuracy"], "num_pseudo": 0}],
        "final_test_accuracy": metrics["test_accuracy"],  # on the source's test split
        "source_test_accuracy": metrics["test_accuracy"],
        "wall_time_s": round(time.time() - start, 2),
    }


def run_finetune(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Fine-tune `ckpt` on the labelled target split with finetune.mode; evaluate."""
    start = time.time()
    task = prepare_task(cfg.data, cfg.seed, run_dir)
    metrics = finetune_round(cfg, task, run_dir, Path(cfg.ckpt))
    return summary(cfg, "finetune", task, [metrics], start)


def finetune_round(
    cfg: DictConfig, task: Task, work_dir: Path, ckpt: Path | None
) -> dict[str, Any]:
    if (work_dir / DONE).exists():
        remove_resume_state(work_dir)  # a kill right after metrics.json may have left it
        return read_json(work_dir / DONE)
    _, metrics = train_round(cfg, task, work_dir, cfg.seed * 1000, None, ckpt)
    metrics.update({"round": 0, "num_pseudo": 0, "finetune_mode": str(cfg.finetune.mode)})
    write_rank_zero(work_dir / DONE, metrics)
    remove_resume_state(work_dir)
    return metrics


def run_baseline(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Pretrain (or take pretrained weights) -> fine-tune on the labelled target -> evaluate."""
    start = time.time()
    task = prepare_task(cfg.data, cfg.seed, run_dir)
    ckpt = pretrained_checkpoint(cfg, run_dir)
    metrics = finetune_round(cfg, task, run_dir / "finetune", ckpt)
    extra: dict[str, Any] = {
        "finetune_mode": str(cfg.finetune.mode),
        "pretrain_source": str(ckpt) if ckpt else f"torchvision {cfg.model.weights}",
    }
    if (run_dir / "pretrain" / DONE).exists():
        pre = read_json(run_dir / "pretrain" / DONE)
        extra.update(
            {"pretrain_source": pre.get("source"), "pretrain_test_accuracy": pre["test_accuracy"]}
        )
    return summary(cfg, "baseline", task, [metrics], start, **extra)


def run_report(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from pipeline.report import write_report

    # Reading the sweep is not split across ranks: rank 0 writes the report alone and every
    # rank gets its result (or its error).
    result: Any = None
    if dist.is_rank_zero():
        try:
            result = write_report(Path(cfg.report.sweep_dir), run_dir)
        except UserError as e:
            result = e
    result = dist.broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    paths = {name: str(path) for name, path in result.pop("paths", {}).items()}
    return {"stage": "report", **result, "paths": paths}


STAGE_FUNCTIONS = {
    "selftrain": run_selftrain,
    "train": run_train,
    "pseudolabel": run_pseudolabel,
    "merge": run_merge,
    "evaluate": run_evaluate,
    "pretrain": run_pretrain,
    "finetune": run_finetune,
    "baseline": run_baseline,
    "report": run_report,
}
