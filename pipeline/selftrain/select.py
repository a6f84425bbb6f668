"""Step 3a, selection: which of the teacher's predictions become pseudo-labels. Small pure
functions on tensors and arrays that read like the papers (threshold, per-class cap, soft
targets), and the per-class diagnostics of what was kept. The handling of real pools
(distribution alignment, CReST, OOD rejection) is pipeline/selftrain/pool.py.

Nothing here knows about Lightning, files or configs, so each piece is tested on hand-made arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.selftrain.pool import (
    PoolHandling,
    align_distribution,
    foreign_fraction,
    keep_fraction_per_class,
    ood_auroc,
    ood_score,
)


@dataclass
class PseudoLabels:
    """The teacher's kept predictions on the unlabelled set (the pseudo_labels.npz arrays)."""

    index: np.ndarray  # int64, position in the unlabelled set, each at most once, sorted
    label: np.ndarray  # int64
    confidence: np.ndarray  # float32
    probs: np.ndarray | None = None  # float32 soft targets: (N, C), or (N, k) with `classes`
    classes: np.ndarray | None = None  # int64 (N, k): the classes of top-k soft targets
    key: np.ndarray | None = None  # str: each sample's key (its file, or shard/key)

    def __len__(self) -> int:
        return len(self.index)

    def arrays(self) -> dict[str, np.ndarray]:
        """What pseudo_labels.npz holds: index, label, confidence, key, and soft targets as
        `probs` (N x C) or, top-k, `topk_probs` and `topk_classes` (N x k)."""
        out = {"index": self.index, "label": self.label, "confidence": self.confidence}
        if self.key is not None:
            out["key"] = self.key
        if self.probs is not None and self.classes is None:
            out["probs"] = self.probs
        elif self.probs is not None:
            out.update(topk_probs=self.probs, topk_classes=self.classes)
        return out


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature sharpening p_i^(1/T) / sum_j p_j^(1/T) (MixMatch); T=1 leaves probs as they are."""
    if temperature == 1.0:
        return probs
    p = probs.clamp_min(1e-12).pow(1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def select_confident(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of the predictions whose max probability reaches the threshold."""
    return confidence.ge(threshold)


def cap_per_class(
    label: torch.Tensor, confidence: torch.Tensor, mask: torch.Tensor, max_per_class: int | None
) -> torch.Tensor:
    """Keep at most `max_per_class` of the selected predictions per class, the most confident first.

    Class balance: without a cap an easy class floods the student with pseudo-labels. Ties are
    broken by position so that the result does not depend on the order of the input.
    """
    if max_per_class is None:
        return mask
    keep = torch.zeros_like(mask)
    for c in label[mask].unique():
        members = torch.nonzero(mask & label.eq(c)).flatten()
        # Stable sort on -confidence keeps the lower index first among equal confidences.
        order = torch.sort(-confidence[members], stable=True).indices
        keep[members[order[:max_per_class]]] = True
    return keep


def balance_target(label: np.ndarray, max_per_class: int | None) -> int | None:
    """K of class balancing (Noisy Student): `max_per_class` when given, else the median of the
    per-class counts of the classes that have any (the upper median, a count some class has: so
    capping at K leaves K the median, and the merge step finds the K the selection used).
    None when nothing was kept."""
    if max_per_class is not None:
        return int(max_per_class)
    counts = np.bincount(np.asarray(label, dtype=np.int64))
    counts = np.sort(counts[counts > 0])
    return int(counts[len(counts) // 2]) if len(counts) else None


def class_cap(balance: str, label: np.ndarray, max_per_class: int | None) -> int | None:
    """The per-class cap the selection applies: with balance=none, `max_per_class` (null: no
    cap); with cap or duplicate, K (balance_target)."""
    if balance == "none":
        return max_per_class
    return balance_target(label, max_per_class)


def duplicate_to_k(label: np.ndarray, confidence: np.ndarray, k: int) -> np.ndarray:
    """Noisy Student's duplication: the rows of a class with fewer than `k` kept pseudo-labels
    repeated up to `k`, cycling through them most confident first (ties: lower row first).

    Returns row numbers into `label` / `confidence`: every row once, in order, then the
    duplicates class by class. Classes with `k` or more rows (capped before) and classes with
    none are left as they are.
    """
    label = np.asarray(label)
    confidence = np.asarray(confidence)
    rows = [np.arange(len(label), dtype=np.int64)]
    for c in np.unique(label):
        members = np.flatnonzero(label == c)
        if len(members) >= k:
            continue
        by_confidence = members[np.argsort(-confidence[members], kind="stable")]
        rows.append(np.resize(by_confidence, k)[len(members) :].astype(np.int64))
    return np.concatenate(rows)


def select_pseudo_labels(
    index: torch.Tensor,
    probs: torch.Tensor,
    threshold: float,
    max_per_class: int | None = None,
    soft: bool = False,
    temperature: float = 1.0,
    balance: str = "none",
    handling: PoolHandling | None = None,
    energy: torch.Tensor | None = None,
) -> PseudoLabels:
    """From the teacher's probabilities on the unlabelled set, the pseudo-labels to keep
    (each sample at most once: duplication for balance=duplicate happens in the merge).

    `index` holds each row's position in the unlabelled set (gathered by index, never by order).
    `handling`: distribution alignment before the threshold, then OOD rejection (on the
    teacher's own scores: msp, or `energy` per row), then CReST's per-class keep rates, then
    the cap.
    """
    if index.numel() != torch.unique(index).numel():
        raise ValueError("duplicate unlabelled index in predictions")
    h = handling or PoolHandling()
    order = torch.argsort(index)
    index, probs = index[order], probs[order].float()
    raw_confidence = probs.max(dim=1).values
    if h.align_weights is not None:
        probs = align_distribution(probs, h.align_weights)
    confidence, label = probs.max(dim=1)
    mask = select_confident(confidence, threshold)
    if h.ood_score != "none" and h.ood_threshold is not None:
        e = energy[order].numpy() if energy is not None else None
        score = ood_score(h.ood_score, raw_confidence.numpy(), e)
        mask &= torch.from_numpy(score >= h.ood_threshold)
    if h.keep_rates is not None:
        mask = keep_fraction_per_class(label, confidence, mask, h.keep_rates)
    cap = class_cap(balance, label[mask].numpy(), max_per_class)
    mask = cap_per_class(label, confidence, mask, cap)
    kept = torch.nonzero(mask).flatten()
    return PseudoLabels(
        index=index[kept].numpy().astype(np.int64),
        label=label[kept].numpy().astype(np.int64),
        confidence=confidence[kept].numpy().astype(np.float32),
        probs=sharpen(probs[kept], temperature).numpy().astype(np.float32) if soft else None,
    )


def select_from_shards(
    files: list[Path],
    plan: Any,
    threshold: float,
    max_per_class: int | None,
    soft: bool,
    temperature: float,
    truth: np.ndarray | None,
    balance: str = "none",
    handling: PoolHandling | None = None,
    foreign: np.ndarray | None = None,
) -> tuple[PseudoLabels, dict[str, Any]]:
    """select_pseudo_labels over the shard files of a labelling pass, one file at a time: the
    same pseudo-labels as over all predictions at once, with memory for what passes the
    threshold only. Also the teacher's confidence histogram and calibration error (ECE, 15
    bins: torchmetrics' stateful metric on the predicted class's confidence and correctness),
    and the count of unreadable images. Checks that every row of every shard is there once.

    `handling` as in select_pseudo_labels (aligned probabilities need shards with `probs`,
    the energy score shards with `energy`); with `foreign` (per pool position: 1 foreign, 0
    known, -1 untold) also `ood_auroc` (of the OOD score, msp when none) and
    `merged_foreign_fraction`."""
    from torchmetrics.classification import BinaryCalibrationError

    from pipeline.runtime.io import read_npz

    h = handling or PoolHandling()
    scores: list[np.ndarray] = []  # each row's OOD score (for the AUROC), and its index
    score_index: list[np.ndarray] = []
    rejected = 0

    kept: list[dict[str, np.ndarray]] = []
    needed = {"index", "label", "confidence", "key"}  # (a shard's other arrays stay there)
    if soft:
        needed |= {"probs", "topk_probs", "topk_classes"}
    counts = np.zeros(20, np.int64)
    # Called on one rank (rank 0 selects for all): no sync with the process group, which
    # the other ranks are not calling (they would wait for rank 0 forever).
    ece = BinaryCalibrationError(n_bins=15, sync_on_compute=False)
    calibrated, bad = False, 0
    for shard, file in enumerate(files):
        z = read_npz(file)
        expected = plan.rows(shard)
        order = np.argsort(z["index"], kind="stable")
        rows = {k: v[order] for k, v in z.items() if v.ndim and len(v) == len(order)}
        index, confidence, label = rows["index"], rows["confidence"], rows["label"]
        bad += int(z.get("num_bad", 0))
        covered = len(np.unique(index)) == len(index) and np.isin(index, expected).all()
        if not covered or len(index) + int(z.get("num_bad", 0)) != len(expected):
            raise RuntimeError(f"{file} does not hold its shard's rows once each")
        counts += np.histogram(confidence, bins=20, range=(0.0, 1.0))[0]
        if truth is not None and (truth[index] >= 0).any():
            known = truth[index] >= 0
            correct = torch.from_numpy((label[known] == truth[index][known]).astype(np.int64))
            ece.update(torch.from_numpy(confidence[known]), correct)
            calibrated = True
        if h.align_weights is not None:  # after the diagnostics: those are the teacher's own
            if "probs" not in rows:
                raise RuntimeError(f"{file} has no probabilities to align")
            aligned = align_distribution(torch.from_numpy(rows["probs"]).float(), h.align_weights)
            top = aligned.max(dim=1)
            rows["probs"] = aligned.numpy()
            rows["confidence"] = top.values.numpy().astype(np.float32)
            rows["label"] = top.indices.numpy().astype(np.int64)
        mask = select_confident(torch.from_numpy(rows["confidence"]), threshold).numpy()
        kind = h.ood_score if h.ood_score != "none" else "msp"
        if h.ood_score != "none" or foreign is not None:
            score = ood_score(kind, confidence, rows.get("energy"))
            scores.append(score)
            score_index.append(index)
            if h.ood_score != "none" and h.ood_threshold is not None:
                inside = score >= h.ood_threshold
                rejected += int((mask & ~inside).sum())
                mask &= inside
        kept.append({k: v[mask] for k, v in rows.items() if k in needed})
    c: dict[str, np.ndarray] = {}
    for name in list(kept[0]) if kept else []:
        # (each shard's part let go as it is joined: the kept rows are held once, not twice)
        c[name] = np.concatenate([part.pop(name) for part in kept])
    label, confidence = torch.from_numpy(c["label"]), torch.from_numpy(c["confidence"])
    keep = torch.ones_like(label, dtype=torch.bool)
    if h.keep_rates is not None:
        keep = keep_fraction_per_class(label, confidence, keep, h.keep_rates)
    cap = class_cap(balance, c["label"][keep.numpy()], max_per_class) if c else max_per_class
    keep = cap_per_class(label, confidence, keep, cap)
    keep_np = keep.numpy()
    every = bool(keep_np.all())  # (the usual case with a low threshold and many images)

    def kept_rows(name: str, dtype: Any = None) -> np.ndarray:
        rows = c[name] if every else c[name][keep_np]  # (every row kept: no copy)
        return rows if dtype is None else rows.astype(dtype, copy=False)

    probs, classes = None, None
    if soft and "probs" in c:
        probs = sharpen(torch.from_numpy(kept_rows("probs")).float(), temperature).numpy()
    elif soft and "topk_probs" in c:  # the top-k, renormalised: a distribution over k classes
        top = torch.from_numpy(kept_rows("topk_probs")).float()
        probs = sharpen(top / top.sum(dim=1, keepdim=True).clamp_min(1e-12), temperature).numpy()
        classes = kept_rows("topk_classes", np.int64)
    pseudo = PseudoLabels(
        index=kept_rows("index", np.int64),
        label=kept_rows("label", np.int64),
        confidence=kept_rows("confidence", np.float32),
        probs=probs.astype(np.float32, copy=False) if probs is not None else None,
        classes=classes,
        key=kept_rows("key"),
    )
    edges = np.linspace(0.0, 1.0, 21)
    stats: dict[str, Any] = {
        "confidence_hist": {"edges": edges.round(4).tolist(), "counts": counts.tolist()},
        "teacher_ece": float(ece.compute()) if calibrated else None,
    }
    stats["num_bad_images"] = bad  # 0 too: the count is always there (data.on_bad_image)
    if h.ood_score != "none":
        stats.update(ood_threshold=h.ood_threshold, num_ood_rejected=rejected)
    if foreign is not None:
        all_index = np.concatenate(score_index) if score_index else np.zeros(0, np.int64)
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        stats["ood_auroc"] = ood_auroc(all_scores, np.asarray(foreign)[all_index])
        stats["merged_foreign_fraction"] = foreign_fraction(pseudo.index, foreign)
    return pseudo, stats


def per_class_stats(
    pseudo: PseudoLabels, true_labels: np.ndarray | None, num_classes: int, num_unlabelled: int
) -> dict[str, list[float | None] | float | None]:
    """Pseudo-label accuracy, per-class precision and coverage, where the true labels are known.

    coverage[c] = kept pseudo-labels whose true class is c / unlabelled samples of class c;
    precision[c] = kept pseudo-labels of label c that are right / kept pseudo-labels of label c.
    Without true labels, coverage is the share of the unlabelled set given label c.
    """
    counts = np.bincount(pseudo.label, minlength=num_classes)
    if true_labels is None or (true_labels < 0).all():
        share = counts / max(1, num_unlabelled)
        return {
            "pseudo_accuracy": None,
            "per_class_precision": None,
            "per_class_coverage": [float(x) for x in share],
        }
    truth = true_labels[pseudo.index]
    known = truth >= 0
    correct = (truth == pseudo.label) & known
    precision: list[float | None] = []
    coverage: list[float | None] = []
    for c in range(num_classes):
        predicted_c = (pseudo.label == c) & known
        precision.append(float(correct[predicted_c].mean()) if predicted_c.any() else None)
        total_c = int((true_labels == c).sum())
        coverage.append(float((truth == c).sum() / total_c) if total_c else None)
    acc = float(correct[known].mean()) if known.any() else None
    return {
        "pseudo_accuracy": acc,
        "per_class_precision": precision,
        "per_class_coverage": coverage,
    }
