"""The labelled / val / unlabelled splits of a dataset's train set, and the unlabelled pool."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.arrays import DataBundle, ImageSet, subset
from pipeline.data.streamed import concat
from pipeline.errors import UserError
from pipeline.runtime.io import write_npz


@dataclass
class Splits:
    """Sorted int64 indices into ``bundle.train``."""

    labelled: np.ndarray
    val: np.ndarray  # may be empty
    unlabelled: np.ndarray

    def __post_init__(self) -> None:
        for name in ("labelled", "val", "unlabelled"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        """What splits.npz holds (written atomically by the run dir)."""
        return {"labelled": self.labelled, "val": self.val, "unlabelled": self.unlabelled}

    def save(self, path: Path) -> None:
        write_npz(path, self.arrays())

    @classmethod
    def load(cls, path: Path) -> Splits:
        """Read a file written by ``save``."""
        with np.load(path, allow_pickle=False) as z:
            return cls(labelled=z["labelled"], val=z["val"], unlabelled=z["unlabelled"])


def make_splits(
    labels: np.ndarray,
    labels_per_class: int | None,
    val_per_class: int,
    seed: int,
    num_classes: int,
) -> Splits:
    """Stratified split: per class a seeded permutation; its first ``labels_per_class`` are the
    label budget, of which the last ``val_per_class`` are val and the others labelled (train);
    the rest is unlabelled. The val images come out of the budget: a run with val spends no more
    labels than one without, and its labelled set is the one of ``labels_per_class -
    val_per_class`` labels without val.

    ``labels_per_class=None`` labels everything (after the val images are taken) and leaves the
    unlabelled set empty.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels_per_class is not None and labels_per_class < 1:
        raise UserError(f"data.labels_per_class must be at least 1, got {labels_per_class}")
    if val_per_class < 0:
        raise UserError(f"data.val_per_class must be 0 or more, got {val_per_class}")
    if labels_per_class is not None and val_per_class >= labels_per_class:
        raise UserError(
            f"data.val_per_class={val_per_class} must be below data.labels_per_class="
            f"{labels_per_class}: the val images come out of the label budget and at least one "
            "label per class must stay for training"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"labels range {labels.min()}..{labels.max()} does not fit data.num_classes="
            f"{num_classes}; set data.num_classes to the number of classes"
        )

    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise UserError(
            f"class {empty[0]} has no training samples; check the data or data.num_classes"
        )
    # With labels_per_class=None at least one image per class must stay labelled.
    needed = labels_per_class if labels_per_class is not None else 1 + val_per_class
    smallest = int(np.argmin(counts))
    if needed > counts[smallest]:
        what = "labels_per_class" if labels_per_class is not None else "val_per_class + 1"
        raise UserError(
            f"class {smallest} has only {counts[smallest]} training samples but "
            f"{what} = {needed}; lower data.labels_per_class or data.val_per_class"
        )

    rng = np.random.default_rng(seed)
    labelled, val, unlabelled = [], [], []
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        if labels_per_class is None:
            val.append(order[:val_per_class])
            labelled.append(order[val_per_class:])
        else:
            train = labels_per_class - val_per_class
            labelled.append(order[:train])
            val.append(order[train:labels_per_class])
            unlabelled.append(order[labels_per_class:])
    return Splits(
        labelled=np.sort(np.concatenate(labelled)),
        val=np.sort(np.concatenate(val)),
        unlabelled=np.sort(np.concatenate(unlabelled)) if unlabelled else np.empty(0, np.int64),
    )


def check_disjoint(**index_sets: np.ndarray) -> None:
    """Raise AssertionError if any set has duplicates or two sets share an index."""
    # Explicit raises rather than `assert`, so the check also runs under python -O.
    names = list(index_sets)
    for name in names:
        values = np.asarray(index_sets[name])
        if len(np.unique(values)) != len(values):
            raise AssertionError(f"index set {name!r} contains duplicate indices")
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = np.intersect1d(index_sets[first], index_sets[second])
            if len(shared):
                raise AssertionError(
                    f"index sets {first!r} and {second!r} overlap in {len(shared)} indices, "
                    f"e.g. {shared[:5].tolist()}"
                )


def unlabelled_pool(bundle: DataBundle, splits: Splits) -> ImageSet:
    """The unlabelled set: ``train[splits.unlabelled]`` followed by ``extra_unlabelled``.

    Positions in the result are the "unlabelled index" used in pseudo_labels.npz. Its labels are
    the true labels where known (-1 for extra_unlabelled images), or None if none are known; they
    are only for reporting pseudo-label accuracy, never for training.
    """
    parts = [subset(bundle.train, splits.unlabelled)]
    if bundle.extra_unlabelled is not None and len(bundle.extra_unlabelled):
        parts.append(bundle.extra_unlabelled)
    return concat(parts)
