"""What a training runs on: images by reference with a target and a weight each (a
TrainingSet, built by the merge step or from the labelled set alone), and the epochs of
batches it is served in, each keeping a fixed share of true labels.

Pure functions on arrays: nothing here knows about Lightning, files or configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainingSet:
    """What a student trains on: images by reference, a target and a weight each.

    `source` says where each row's image comes from (0: labelled set, 1: unlabelled set) and
    `position` where in that set; labelled rows come first. Targets are one-hot rows of
    `label`, or for pseudo-labelled rows with soft targets the teacher's probabilities
    (`soft_probs`, over every class or over `soft_classes`): built per batch, so memory grows
    with the rows, not rows x classes.
    """

    source: np.ndarray  # int8 (N,)
    position: np.ndarray  # int64 (N,)
    label: np.ndarray  # int64 (N,)
    weight: np.ndarray  # float32 (N,)
    num_classes: int
    soft_probs: np.ndarray | None = None  # float32 (N_pseudo, C or k)
    soft_classes: np.ndarray | None = None  # int64 (N_pseudo, k) for top-k soft targets

    @classmethod
    def labelled_only(cls, labels: np.ndarray, num_classes: int) -> TrainingSet:
        """The labelled set alone: one-hot targets, weight 1 (a teacher, a pretraining)."""
        n = len(labels)
        return cls(
            source=np.zeros(n, np.int8),
            position=np.arange(n, dtype=np.int64),
            label=np.asarray(labels, np.int64),
            weight=np.ones(n, np.float32),
            num_classes=num_classes,
        )

    def __len__(self) -> int:
        return len(self.position)

    @property
    def num_labelled(self) -> int:
        return int((self.source == 0).sum())

    def target_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The target distributions of `rows` (float32, rows x classes)."""
        rows = np.asarray(rows, np.int64)
        out = one_hot(self.label[rows], self.num_classes)
        if self.soft_probs is not None:
            soft = np.flatnonzero(rows >= self.num_labelled)
            j = rows[soft] - self.num_labelled
            out[soft] = 0.0
            if self.soft_classes is None:
                out[soft] = self.soft_probs[j]
            else:
                out[soft[:, None], self.soft_classes[j]] = self.soft_probs[j]
        return torch.from_numpy(out)

    def class_prior(self, batch_size: int, labelled_fraction: float) -> np.ndarray:
        """The share of each class in the loss of the batches `mixed_batches` makes of this set:
        the weighted target mass per class (duplicated rows count twice, soft targets spread)
        that a batch holds on average, its labelled and pseudo-labelled rows mixed as the
        batches mix them."""
        n_lab, n = self.num_labelled, len(self)
        if n == n_lab or n_lab == 0 or labelled_fraction >= 1.0:
            mass = self._class_mass(0, n)
        else:
            lab = labelled_per_batch(batch_size, labelled_fraction)  # rows of each kind a batch
            pseudo = batch_size - lab  # holds, times the mean mass of a row of that kind
            mass = self._class_mass(0, n_lab) * lab / n_lab
            mass += self._class_mass(n_lab, n) * pseudo / (n - n_lab)
        return mass / mass.sum()

    def _class_mass(self, start: int, stop: int, chunk: int = 8192) -> np.ndarray:
        """The weighted target mass per class of rows start..stop, chunk by chunk: a weighted
        count of the one-hot rows' labels, the soft rows' targets summed, so memory grows
        neither with the rows nor with rows x classes."""
        mass = np.zeros(self.num_classes, np.float64)
        soft_from = self.num_labelled if self.soft_probs is not None else stop  # the last rows
        for lo in range(start, stop, chunk):
            hi = min(lo + chunk, stop)
            mid = min(max(lo, soft_from), hi)  # lo..mid one-hot, mid..hi soft
            mass += np.bincount(self.label[lo:mid], self.weight[lo:mid], self.num_classes)
            if mid < hi:
                soft = np.arange(mid, hi)
                mass += (self.target_rows(soft).numpy() * self.weight[soft, None]).sum(0)
        return mass

    def arrays(self) -> dict[str, np.ndarray]:
        """What train_set.npz holds (targets as one row per sample)."""
        return {
            "source": self.source,
            "position": self.position,
            "targets": self.target_rows(np.arange(len(self))).numpy(),
            "weight": self.weight,
        }


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def labelled_per_batch(batch_size: int, labelled_fraction: float) -> int:
    """The labelled rows in each batch of `mixed_batches` (at least one, and one pseudo-label)."""
    return min(batch_size - 1, max(1, round(labelled_fraction * batch_size)))


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
    n_lab_b = labelled_per_batch(batch_size, labelled_fraction)
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
