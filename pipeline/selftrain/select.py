"""Step 3a, selection: which of the teacher's predictions become pseudo-labels. Small pure
functions on tensors and arrays that read like the papers (threshold, per-class cap, soft
targets), and the per-class diagnostics of what was kept.

Nothing here knows about Lightning, files or configs, so each piece is tested on hand-made arrays.
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
