"""Step 3b, merging: the student's training set, the labelled rows, then the kept
pseudo-labelled ones (engine/training_set.py serves it in batches that each keep a fixed
share of true labels).

Pure functions on arrays: nothing here knows about Lightning, files or configs.
"""

from __future__ import annotations

import numpy as np

from pipeline.engine.training_set import TrainingSet
from pipeline.selftrain.select import PseudoLabels, duplicate_to_k


def merge_labelled_and_pseudo(
    labelled_labels: np.ndarray,
    pseudo: PseudoLabels | None,
    num_classes: int,
    pseudo_weight: float = 1.0,
    duplicate_to: int | None = None,
) -> TrainingSet:
    """Labelled samples (one-hot, weight 1) followed by the kept pseudo-labelled ones.

    Soft pseudo-labels keep the teacher's (sharpened) probabilities as targets; hard ones are
    one-hot. Only the teacher's outputs enter here, never the unlabelled set's true labels.
    `duplicate_to=K` (pseudo_label.balance=duplicate): the pseudo-labelled rows of classes with
    fewer than K are repeated up to K (select.duplicate_to_k), so several rows may reference the
    same image.
    """
    n_lab = len(labelled_labels)
    if pseudo is not None and duplicate_to is not None and len(pseudo):
        rows = duplicate_to_k(pseudo.label, pseudo.confidence, duplicate_to)
        pseudo = PseudoLabels(
            index=pseudo.index[rows],
            label=pseudo.label[rows],
            confidence=pseudo.confidence[rows],
            probs=pseudo.probs[rows] if pseudo.probs is not None else None,
            classes=pseudo.classes[rows] if pseudo.classes is not None else None,
        )
    n = len(pseudo) if pseudo is not None else 0
    return TrainingSet(
        source=np.concatenate([np.zeros(n_lab, np.int8), np.ones(n, np.int8)]),
        position=np.concatenate(
            [np.arange(n_lab, dtype=np.int64), pseudo.index.astype(np.int64) if n else []]
        ).astype(np.int64),
        label=np.concatenate(
            [np.asarray(labelled_labels, np.int64), pseudo.label if n else []]
        ).astype(np.int64),
        weight=np.concatenate([np.ones(n_lab, np.float32), np.full(n, pseudo_weight, np.float32)]),
        num_classes=num_classes,
        soft_probs=pseudo.probs.astype(np.float32) if n and pseudo.probs is not None else None,
        soft_classes=pseudo.classes if n and pseudo.probs is not None else None,
    )
