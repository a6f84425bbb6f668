"""Step 2, pseudo-labelling, as a resumable map over shards of the unlabelled pool.

The pool is cut into shards (`pseudo_label.num_shards`, or one per `pseudo_label.shard_size`
images). Each rank of a job, or each job of an array (`pseudo_label.shard=I`), labels its shards
with the teacher (the mean over the clean image and fixed test-time views) and writes one file
per shard, atomically: a killed pass redoes only the shards without a file. Selection
(select.py) and the diagnostics (per-class precision and coverage, confidence histogram, the
teacher's calibration) then stream over the shard files: memory grows with what is kept, never
with the pool times the classes.

Real pools (pseudo_label.dist_align, rebalance_alpha, ood_score): the shards then also keep every
class's probability (to re-weight them) or each image's energy (logsumexp of the clean view's
logits, not of the views' mean), and selection compares the pool with the labelled (and val)
set: its class counts, and the teacher's OOD scores on its images (selection_context).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config.specs import DataSpec, PseudoLabelSpec, RunSpec
from pipeline.data.arrays import ImageSet
from pipeline.data.splits import network_classes
from pipeline.data.streamed import check_unchanged, concat
from pipeline.data.task import Task
from pipeline.engine.augment import views_fn
from pipeline.engine.datamodule import ViewsFn
from pipeline.engine.features import labelling_inputs
from pipeline.engine.fit import batches
from pipeline.engine.predict import ShardPlan, Unreadable, predict_scores, predict_shards
from pipeline.errors import UserError
from pipeline.models.checkpoint import load_net
from pipeline.runtime import io
from pipeline.runtime.rundir import RunDir, Step
from pipeline.selftrain.pool import (
    PoolHandling,
    alignment_weights,
    crest_keep_rates,
    em_prior,
    ood_score,
    ood_threshold,
)
from pipeline.selftrain.select import (
    PseudoLabels,
    balance_target,
    duplicate_to_k,
    per_class_stats,
    select_from_shards,
)

PSEUDO_LABELS = "pseudo_labels.npz"
DIAGNOSTICS = "pseudo_diagnostics.json"
SHARDS = "pseudo_shards"  # the shard files of a round: resume state until the round is done


def label_unlabelled(
    cfg: RunSpec, task: Task, teacher_ckpt: Path, step: Step
) -> tuple[PseudoLabels, dict[str, Any]]:
    """The teacher's pseudo-labels for the round in `step`, and their diagnostics (read back
    when a resumed run finds them written)."""
    run = step.run
    out, diagnostics_path = step / PSEUDO_LABELS, step / DIAGNOSTICS
    if run.exists(out, diagnostics_path):
        pseudo = read_pseudo_labels(out, len(task.unlabelled), task.num_classes)
        return pseudo, io.read_json(diagnostics_path)
    run.on_rank_zero(lambda: check_unchanged(task.unlabelled, "the unlabelled pool"))
    with run.timed("labelling"):
        teacher = load_net(cfg, teacher_ckpt, task.num_classes)
        # A teacher trained on cached features labels the pool's cached features.
        teacher, sets = labelling_inputs(cfg, teacher, task, run, teacher_ckpt) or (teacher, task)
        pseudo, diagnostics = pseudo_label(
            cfg, cfg.data, teacher, sets.unlabelled, out, run, task.unlabelled_truth(), sets
        )
    run.write_json(diagnostics_path, diagnostics)
    return pseudo, diagnostics


def pseudo_label(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    pool: ImageSet,
    out: Path,
    run: RunDir,
    truth: np.ndarray | None,
    task: Task | None = None,
) -> tuple[PseudoLabels, dict[str, Any]]:
    """Label every shard of the pool (those not labelled yet), select, write `out`
    (pseudo_labels.npz) atomically. The kept pseudo-labels and their diagnostics. `task`
    gives what pseudo_label.dist_align=labelled|estimated, rebalance_alpha and ood_score
    compare the pool with (the labelled and val sets), and an open-set pool's truth."""
    shard_dir = out.parent / SHARDS if out.name == PSEUDO_LABELS else out.with_suffix(".shards")
    plan = label_shards(cfg, data, net, pool, shard_dir, run)
    context = selection_context(cfg, data, net, task)  # every rank: it predicts
    num_classes = network_classes(data.node)
    return select_and_write(cfg, plan, shard_dir, out, run, truth, num_classes, context)


def selection_context(
    cfg: RunSpec, data: DataSpec, net: torch.nn.Module, task: Task | None
) -> dict[str, Any]:
    """What selection needs of the task beyond the pool: the labelled class counts, the
    teacher's OOD scores on the labelled and val images (the same views as the pool's; msp
    is their mean probability's max, energy the clean view's) and the pool's foreign flags."""
    pl = cfg.pseudo_label
    needs_task = (
        pl.dist_align in ("labelled", "estimated")
        or pl.rebalance_alpha is not None
        or pl.ood_score != "none"
    )
    if task is None:
        if needs_task:
            raise UserError(
                "pseudo_label.dist_align=labelled|estimated, rebalance_alpha and ood_score need "
                "the labelled set: use them with stage=selftrain"
            )
        return {}
    context: dict[str, Any] = {
        "labelled_counts": np.bincount(task.labelled.labels.numpy(), minlength=task.num_classes),
        "foreign": task.pool_foreign,
    }
    kind = str(pl.ood_score)
    if kind != "none":
        reference = concat([task.labelled, *([task.val] if task.val is not None else [])])
        views = teacher_views(cfg, data)
        _, probs, energy = predict_scores(cfg, data, net, batches(data, reference), views)
        context["reference_scores"] = ood_score(kind, probs.max(axis=1, initial=0.0), energy)
    return context


def pool_handling(
    pl: PseudoLabelSpec, files: list[Path], context: dict[str, Any]
) -> tuple[PoolHandling, dict[str, Any]]:
    """The PoolHandling of pseudo_label.dist_align / prior / rebalance_alpha / ood_score over
    this pass's shard files, and what it found (for the diagnostics)."""
    mode = str(pl.dist_align)
    counts = context.get("labelled_counts")
    prior = counts / max(1, counts.sum()) if counts is not None else None
    found: dict[str, Any] = {}
    weights = None

    def chunks():
        return (io.read_npz(f)["probs"].astype(np.float64) for f in files)

    if mode != "none":
        total, n = 0.0, 0
        for p in chunks():
            total, n = total + p.sum(axis=0), n + len(p)
        pool_mean = np.asarray(total) / max(1, n)
        given = np.asarray(pl.prior, np.float64) if pl.prior is not None else None
        estimated = em_prior(chunks, prior) if mode == "estimated" else None
        weights = alignment_weights(mode, pool_mean, prior, given, estimated)
        found["dist_align_weights"] = [round(float(w), 6) for w in weights]
        if estimated is not None:
            found["estimated_prior"] = [round(float(x), 6) for x in estimated]
    rates = None
    if pl.rebalance_alpha is not None:
        rates = crest_keep_rates(counts, float(pl.rebalance_alpha))
        found["rebalance_keep_rates"] = [round(float(r), 6) for r in rates]
    kind = str(pl.ood_score)
    threshold = None
    if kind != "none":
        threshold = ood_threshold(context["reference_scores"], float(pl.ood_quantile))
    return PoolHandling(weights, rates, kind, threshold), found


def shard_plan(cfg: RunSpec, n: int) -> ShardPlan:
    """The pool's shards: pseudo_label.num_shards, or one per pseudo_label.shard_size images."""
    pl = cfg.pseudo_label
    num = pl.num_shards or max(1, math.ceil(n / int(pl.shard_size)))
    return ShardPlan(n, int(num))


def shard_file(shard_dir: Path, shard: int, plan: ShardPlan) -> Path:
    """A labelled shard's file: the one place its name is spelled."""
    return shard_dir / shard_name(f"{shard:05d}", plan)


def shard_name(shard: str, plan: ShardPlan) -> str:
    return f"shard-{shard}-of-{plan.num_shards:05d}.npz"


def shards_done(shard_dir: Path, plan: ShardPlan) -> int:
    """How many of the plan's shards are labelled in shard_dir."""
    return len(list(shard_dir.glob(shard_name("*", plan))))


def label_shards(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    pool: ImageSet,
    shard_dir: Path,
    run: RunDir,
    only: int | None = None,
) -> ShardPlan:
    """Label the shards of the pool that have no file yet (`only`: just that one); the ranks
    of this job take them in turn, each writing the files of its shards."""
    plan = shard_plan(cfg, len(pool))
    wanted = range(plan.num_shards) if only is None else [only]
    if only is not None and not 0 <= only < plan.num_shards:
        raise UserError(
            f"pseudo_label.shard={only} is out of range: the pool has {plan.num_shards} shards "
            f"(pseudo_label.num_shards); pass 0..{plan.num_shards - 1}"
        )
    todo = run.on_rank_zero(
        lambda: [s for s in wanted if not shard_file(shard_dir, s, plan).exists()]
    )
    if not todo:
        return plan
    pl = cfg.pseudo_label
    soft_topk = pl.soft_topk if pl.soft else None
    # Distribution alignment re-weights every class's probability: the shards keep them all.
    keep_probs = pl.soft or pl.dist_align != "none"
    extras = ("energy",) if pl.ood_score == "energy" else ()

    def write(
        shard: int, index: np.ndarray, probs: np.ndarray, bad: Unreadable, **extra: np.ndarray
    ) -> None:
        arrays = shard_arrays(pool, index, probs, len(bad), keep_probs, soft_topk)
        arrays.update({name: v.astype(np.float32) for name, v in extra.items()})
        io.write_npz(shard_file(shard_dir, shard, plan), arrays)

    views = teacher_views(cfg, data)
    todo_rows = {s: plan.rows(s) for s in todo}
    predict_shards(cfg, data, net, batches(data, pool), todo_rows, write, views, extras)
    return plan


def shard_arrays(
    pool: ImageSet,
    index: np.ndarray,
    probs: np.ndarray,
    bad: int,
    soft: bool,
    soft_topk: int | None,
) -> dict[str, np.ndarray]:
    """A shard file: each labelled row's index, key, predicted class and confidence (and its
    probabilities when soft targets are kept: all of them, or the top-k); the count of rows
    that could not be read."""
    confidence, label = torch.from_numpy(probs).max(dim=1)
    arrays = {
        "index": index,
        "key": pool.keys(index),
        "label": label.numpy().astype(np.int64),
        "confidence": confidence.numpy().astype(np.float32),
        "num_bad": np.array(bad, np.int64),
    }
    if soft and soft_topk:
        top = torch.from_numpy(probs).topk(min(int(soft_topk), probs.shape[1]), dim=1)
        arrays.update(topk_probs=top.values.numpy(), topk_classes=top.indices.numpy())
    elif soft:
        arrays["probs"] = probs.astype(np.float32)
    return arrays


def select_and_write(
    cfg: RunSpec,
    plan: ShardPlan,
    shard_dir: Path,
    out: Path,
    run: RunDir,
    truth: np.ndarray | None,
    num_classes: int,
    context: dict[str, Any] | None = None,
) -> tuple[PseudoLabels, dict[str, Any]]:
    """Rank 0 selects over the shard files and writes `out`; every rank gets the result.
    `context`: selection_context's (labelled counts, OOD reference scores, foreign flags)."""
    context = context or {}
    files = [shard_file(shard_dir, s, plan) for s in range(plan.num_shards)]

    def select() -> dict[str, Any]:
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(
                f"{len(missing)} of {plan.num_shards} shards are not labelled yet in {shard_dir} "
                f"(e.g. {missing[0]}); run the jobs of pseudo_label.shard=... first"
            )
        pl = cfg.pseudo_label
        balance = str(pl.balance)
        handling, found = pool_handling(pl, files, context)
        kept, stats = select_from_shards(
            files, plan, pl.threshold, pl.max_per_class, pl.soft, pl.temperature, truth, balance,
            handling, context.get("foreign"),
        )  # fmt: skip
        io.write_npz(out, kept.arrays())
        diagnostics: dict[str, Any] = {"num_pseudo": len(kept), **found}
        if balance != "none":
            diagnostics["balance"] = balance
            diagnostics["balance_k"] = balance_target(kept.label, pl.max_per_class)
        if balance == "duplicate" and len(kept):
            k = diagnostics["balance_k"]
            diagnostics["num_pseudo_rows"] = len(duplicate_to_k(kept.label, kept.confidence, k))
        diagnostics.update(per_class_stats(kept, truth, num_classes, plan.n))
        diagnostics.update(stats)
        return diagnostics

    diagnostics = run.on_rank_zero(select)
    return read_pseudo_labels(out, plan.n, num_classes), diagnostics


def teacher_views(cfg: RunSpec, data: DataSpec) -> ViewsFn | None:
    """The fixed views the teacher averages over (pseudo_label.tta_views of data.augment's
    affine ranges); None without views or augmentation."""
    return views_fn(int(cfg.pseudo_label.tta_views), data.augment)


def read_pseudo_labels(path: Path, num_unlabelled: int, num_classes: int) -> PseudoLabels:
    """pseudo_labels.npz, checked: indices in range and unique, labels in range.

    Without the samples' keys (file names, for the people who read the file): a student never
    needs them, and as text they are the largest array of the file (92 bytes an image for a tar
    member's name: 92 MB of a round over 10^6 images)."""
    z = io.read_npz(path, skip=("key",))
    missing = {"index", "label", "confidence"} - set(z)
    if missing:
        raise UserError(f"{path} lacks arrays {sorted(missing)}; expected a pseudo_labels.npz")
    index, label = z["index"].astype(np.int64, copy=False), z["label"].astype(np.int64, copy=False)
    if len(index) and (index.min() < 0 or index.max() >= num_unlabelled):
        raise UserError(
            f"{path} has indices outside the unlabelled set (size {num_unlabelled}); "
            "was it made for another dataset, labels_per_class or seed?"
        )
    if len(np.unique(index)) != len(index):
        raise UserError(f"{path} lists an unlabelled index more than once")
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}")
    probs, classes = z.get("probs"), None
    if "topk_probs" in z:
        probs, classes = z["topk_probs"], z["topk_classes"].astype(np.int64, copy=False)
    confidence = z["confidence"].astype(np.float32, copy=False)
    return PseudoLabels(index, label, confidence, probs, classes)
