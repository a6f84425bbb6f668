"""Pseudo-label selection and merging: small pure functions on tensors, read like the papers.

Nothing here knows about Lightning, files or configs, so each piece is tested on hand-made tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PseudoLabels:
    """The teacher's kept predictions on the unlabelled set (the pseudo_labels.npz arrays)."""

    index: np.ndarray  # int64, position in the unlabelled set, each at most once, sorted
    label: np.ndarray  # int64
    confidence: np.ndarray  # float32
    probs: np.ndarray | None = None  # float32 (N, C), only for soft targets

    def __len__(self) -> int:
        return len(self.index)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"index": self.index, "label": self.label, "confidence": self.confidence}
        if self.probs is not None:
            out["probs"] = self.probs
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


def select_pseudo_labels(
    index: torch.Tensor,
    probs: torch.Tensor,
    threshold: float,
    max_per_class: int | None = None,
    soft: bool = False,
    temperature: float = 1.0,
) -> PseudoLabels:
    """From the teacher's probabilities on the unlabelled set, the pseudo-labels to keep.

    `index` holds each row's position in the unlabelled set (gathered by index, never by order).
    """
    if index.numel() != torch.unique(index).numel():
        raise ValueError("duplicate unlabelled index in predictions")
    order = torch.argsort(index)
    index, probs = index[order], probs[order].float()
    confidence, label = probs.max(dim=1)
    mask = select_confident(confidence, threshold)
    mask = cap_per_class(label, confidence, mask, max_per_class)
    kept = torch.nonzero(mask).flatten()
    return PseudoLabels(
        index=index[kept].numpy().astype(np.int64),
        label=label[kept].numpy().astype(np.int64),
        confidence=confidence[kept].numpy().astype(np.float32),
        probs=sharpen(probs[kept], temperature).numpy().astype(np.float32) if soft else None,
    )


@dataclass
class TrainingSet:
    """What a student trains on: images by reference, a target distribution and a weight each.

    `source` says where each row's image comes from (0: labelled set, 1: unlabelled set) and
    `position` where in that set. Hard labels are one-hot rows of `targets`.
    """

    source: np.ndarray  # int8 (N,)
    position: np.ndarray  # int64 (N,)
    targets: np.ndarray  # float32 (N, C)
    weight: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.position)

    @property
    def num_labelled(self) -> int:
        return int((self.source == 0).sum())


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def merge_labelled_and_pseudo(
    labelled_labels: np.ndarray,
    pseudo: PseudoLabels | None,
    num_classes: int,
    pseudo_weight: float = 1.0,
) -> TrainingSet:
    """Labelled samples (one-hot, weight 1) followed by the kept pseudo-labelled ones.

    Soft pseudo-labels keep the teacher's (sharpened) probabilities as targets; hard ones are
    one-hot. Only the teacher's outputs enter here, never the unlabelled set's true labels.
    """
    n_lab = len(labelled_labels)
    parts_source = [np.zeros(n_lab, np.int8)]
    parts_position = [np.arange(n_lab, dtype=np.int64)]
    parts_targets = [one_hot(labelled_labels, num_classes)]
    parts_weight = [np.ones(n_lab, np.float32)]
    if pseudo is not None and len(pseudo):
        n = len(pseudo)
        parts_source.append(np.ones(n, np.int8))
        parts_position.append(pseudo.index.astype(np.int64))
        parts_targets.append(
            pseudo.probs.astype(np.float32)
            if pseudo.probs is not None
            else one_hot(pseudo.label, num_classes)
        )
        parts_weight.append(np.full(n, pseudo_weight, np.float32))
    return TrainingSet(
        source=np.concatenate(parts_source),
        position=np.concatenate(parts_position),
        targets=np.concatenate(parts_targets),
        weight=np.concatenate(parts_weight),
    )


def mixed_batches(
    num_labelled: int,
    num_pseudo: int,
    batch_size: int,
    labelled_fraction: float,
    generator: np.random.Generator,
    min_batches: int = 1,
) -> list[np.ndarray]:
    """One epoch of batches (rows of a TrainingSet) with a fixed share of labelled samples.

    With few labels and many pseudo-labels, plain shuffling would leave most batches without a
    single true label; here each batch holds round(labelled_fraction * batch_size) labelled rows,
    the labelled set being cycled (oversampled) as often as needed. The epoch ends when every
    pseudo-labelled row was seen once. Without pseudo-labels it is a plain shuffled epoch. A tiny
    set is cycled to give at least `min_batches` batches, so an epoch is never a single step.
    """
    if num_pseudo == 0 or labelled_fraction >= 1.0:
        total = num_labelled + num_pseudo
        if -(-total // batch_size) >= min_batches:
            perm = generator.permutation(total)
            return [perm[i : i + batch_size] for i in range(0, total, batch_size)]
        reps = -(-(min_batches * batch_size) // total)
        rows = np.concatenate([generator.permutation(total) for _ in range(reps)])
        return [rows[b * batch_size : (b + 1) * batch_size] for b in range(min_batches)]
    n_lab_b = min(batch_size - 1, max(1, round(labelled_fraction * batch_size)))
    n_ps_b = batch_size - n_lab_b
    n_batches = max(min_batches, -(-num_pseudo // n_ps_b))
    reps_ps = -(-(n_batches * n_ps_b) // num_pseudo)
    pseudo_rows = num_labelled + np.concatenate(
        [generator.permutation(num_pseudo) for _ in range(reps_ps)]
    )
    reps = -(-(n_batches * n_lab_b) // num_labelled)
    lab_rows = np.concatenate([generator.permutation(num_labelled) for _ in range(reps)])
    return [
        np.concatenate(
            [lab_rows[b * n_lab_b : (b + 1) * n_lab_b], pseudo_rows[b * n_ps_b : (b + 1) * n_ps_b]]
        )
        for b in range(n_batches)
    ]


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
