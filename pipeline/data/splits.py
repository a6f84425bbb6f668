"""The labelled / val / unlabelled splits of a dataset's train set, and the unlabelled pool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # Open-set pools (data.open_set): the dataset class of each network class (label k of the
    # network is class known_classes[k]); None: every class is known, labels as they are.
    known_classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("labelled", "val", "unlabelled"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        if self.known_classes is not None:
            self.known_classes = np.asarray(self.known_classes, dtype=np.int64)

    def arrays(self) -> dict[str, np.ndarray]:
        """What splits.npz holds (written atomically by the run dir); `known_classes` only
        with an open-set pool, so that a default run writes the same file as before."""
        out = {"labelled": self.labelled, "val": self.val, "unlabelled": self.unlabelled}
        if self.known_classes is not None:
            out["known_classes"] = self.known_classes
        return out

    def save(self, path: Path) -> None:
        write_npz(path, self.arrays())

    @classmethod
    def load(cls, path: Path) -> Splits:
        """Read a file written by ``save``."""
        with np.load(path, allow_pickle=False) as z:
            known = z.get("known_classes")
            return cls(z["labelled"], z["val"], z["unlabelled"], known)


UNLABELLED_ORDERS = ("same", "reversed", "uniform")


@dataclass(frozen=True)
class PoolSpec:
    """What data.imbalance and data.open_set ask of the splits (all off by default).

    `labelled_ratio` / `unlabelled_ratio`: max / min class count of the labelled set and of the
    pool (None or 1: balanced), with the exponential profile of DARP / CReST
    N_k = N_1 * ratio^(-(k-1)/(C-1)) over the known classes in index order (the first the most
    frequent); `unlabelled_order`: the pool's profile in the same order, reversed, or uniform
    (the pool keeps every image). `known_classes`: the classes of the labelled, val and test
    sets; the pool also holds the others (None: every class is known) unless
    `unknown_in_pool` is False: then the unknown classes' images are left out, and the known
    classes' splits stay those of the open-set pool (the control run of an open-set benchmark)."""

    labelled_ratio: float | None = None
    unlabelled_ratio: float | None = None
    unlabelled_order: str = "same"
    known_classes: tuple[int, ...] | None = None
    unknown_in_pool: bool = True

    @property
    def is_default(self) -> bool:
        return self == PoolSpec()


def pool_spec(data_cfg: Mapping[str, Any], num_classes: int) -> PoolSpec:
    """The PoolSpec of a data config node (data.imbalance.*, data.open_set.known_classes),
    checked; `num_classes` is the dataset's."""
    imbalance = data_cfg.get("imbalance") or {}
    open_set = data_cfg.get("open_set") or {}
    ratios = []
    for key in ("labelled_ratio", "unlabelled_ratio"):
        value = imbalance.get(key)
        if value is not None and (isinstance(value, bool) or float(value) < 1):
            raise UserError(
                f"data.imbalance.{key}={value} must be >= 1 (max/min class count) or null"
            )
        ratios.append(None if value is None or float(value) == 1 else float(value))
    order = str(imbalance.get("unlabelled_order") or "same")
    if order not in UNLABELLED_ORDERS:
        raise UserError(
            f"data.imbalance.unlabelled_order={order!r}; choose one of {', '.join(UNLABELLED_ORDERS)}"
        )
    if order == "uniform" and ratios[1] is not None:
        raise UserError(
            "data.imbalance.unlabelled_order=uniform keeps every pool image; drop "
            "data.imbalance.unlabelled_ratio (or pass unlabelled_order=same|reversed)"
        )
    known = resolve_known_classes(open_set.get("known_classes"), num_classes)
    unknown_in_pool = open_set.get("unknown_in_pool", True)
    if not isinstance(unknown_in_pool, bool):
        raise UserError(f"data.open_set.unknown_in_pool={unknown_in_pool!r} must be true or false")
    if not unknown_in_pool and known is None:
        raise UserError(
            "data.open_set.unknown_in_pool=false leaves the unknown classes out of an open-set "
            "pool; pass data.open_set.known_classes too"
        )
    if not unknown_in_pool and open_set.get("extra_pool"):
        raise UserError(
            "data.open_set.unknown_in_pool=false keeps foreign images out of the pool, "
            "data.open_set.extra_pool adds them; drop one of the two"
        )
    return PoolSpec(ratios[0], ratios[1], order, known, unknown_in_pool)


def resolve_known_classes(value: Any, num_classes: int) -> tuple[int, ...] | None:
    """data.open_set.known_classes as sorted class indices: an int K means 0..K-1, a list names
    them; None: off. At least two known classes and at least one unknown one."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UserError("data.open_set.known_classes must be an int K or a list of class indices")
    known = (
        tuple(range(int(value)))
        if isinstance(value, int)
        else tuple(sorted({int(v) for v in value}))
    )
    if len(known) < 2 or len(known) >= num_classes or min(known) < 0 or max(known) >= num_classes:
        raise UserError(
            f"data.open_set.known_classes={value} must name 2 to {num_classes - 1} classes in "
            f"0..{num_classes - 1} (the others become the pool's unknown classes), or be null"
        )
    return known


def network_classes(data_cfg: Mapping[str, Any]) -> int:
    """The classes of the network trained on this data: data.num_classes, or with an open-set
    pool the number of known classes (labels remapped 0..K-1)."""
    num_classes = int(data_cfg["num_classes"])
    open_set = data_cfg.get("open_set") or {}
    known = resolve_known_classes(open_set.get("known_classes"), num_classes)
    return num_classes if known is None else len(known)


def remap_labels(labels: np.ndarray, known: Sequence[int]) -> np.ndarray:
    """Dataset labels -> network labels: known class known[k] -> k, any other -> -1."""
    table = np.full(max(int(np.max(labels, initial=0)), max(known)) + 1, -1, np.int64)
    table[np.asarray(known, np.int64)] = np.arange(len(known))
    labels = np.asarray(labels, np.int64)
    return np.where(labels >= 0, table[np.clip(labels, 0, None)], -1)


def long_tail_counts(n_first: float, ratio: float | None, num: int) -> np.ndarray:
    """N_k = N_1 * ratio^(-(k-1)/(C-1)) for k = 1..num (at least 1 each, rounded down)."""
    if ratio is None or num < 2:
        return np.full(num, int(n_first), np.int64)
    k = np.arange(num, dtype=np.float64)
    return np.maximum(1, np.floor(n_first * ratio ** (-k / (num - 1)) + 1e-9)).astype(np.int64)


def make_splits(
    labels: np.ndarray,
    labels_per_class: int | None,
    val_per_class: int,
    seed: int,
    num_classes: int,
    pool: PoolSpec | None = None,
) -> Splits:
    """Stratified split: per class a seeded permutation; its first ``labels_per_class`` are the
    label budget, of which the last ``val_per_class`` are val and the others labelled (train);
    the rest is unlabelled. The val images come out of the budget: a run with val spends no more
    labels than one without, and its labelled set is the one of ``labels_per_class -
    val_per_class`` labels without val.

    ``labels_per_class=None`` labels everything (after the val images are taken) and leaves the
    unlabelled set empty.

    ``pool`` (data.imbalance, data.open_set; default: off, the splits above unchanged): the
    known class of rank k keeps N_k = (labels_per_class - val_per_class) *
    labelled_ratio^(-k/(K-1)) labelled images (then its val images); the pool keeps the first
    N_k of each class's remaining images, N_k following unlabelled_ratio in the same or the
    reversed order, N_1 the largest count every class can give; unknown classes give all their
    images to the pool (or none, with unknown_in_pool=False). The same seeded permutations as
    the balanced splits.
    """
    labels = np.asarray(labels, dtype=np.int64)
    pool = pool or PoolSpec()
    known = pool.known_classes if pool.known_classes is not None else tuple(range(num_classes))
    if not pool.is_default and labels_per_class is None:
        raise UserError(
            "data.imbalance and data.open_set need data.labels_per_class (a number per class)"
        )
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
    smallest = known[int(np.argmin(counts[list(known)]))]  # unknown classes need no labels
    if needed > counts[smallest]:
        what = "labels_per_class" if labels_per_class is not None else "val_per_class + 1"
        raise UserError(
            f"class {smallest} has only {counts[smallest]} training samples but "
            f"{what} = {needed}; lower data.labels_per_class or data.val_per_class"
        )

    rng = np.random.default_rng(seed)
    rank = {c: r for r, c in enumerate(known)}
    if labels_per_class is not None:
        train_counts = long_tail_counts(
            labels_per_class - val_per_class, pool.labelled_ratio, len(known)
        )
    labelled, val, unlabelled = [], [], []
    rest: dict[int, np.ndarray] = {}
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        if labels_per_class is None:
            val.append(order[:val_per_class])
            labelled.append(order[val_per_class:])
        elif c not in rank:  # an unknown class of an open-set pool: all of it in the pool
            if pool.unknown_in_pool:
                unlabelled.append(order)
        else:
            train = int(train_counts[rank[c]])
            labelled.append(order[:train])
            val.append(order[train : train + val_per_class])
            rest[c] = order[train + val_per_class :]
    if pool.unlabelled_ratio is not None and pool.unlabelled_order != "uniform":
        rest = long_tail_pool(rest, known, pool.unlabelled_ratio, pool.unlabelled_order)
    unlabelled += [rest[c] for c in known if c in rest]
    return Splits(
        labelled=np.sort(np.concatenate(labelled)),
        val=np.sort(np.concatenate(val)),
        unlabelled=np.sort(np.concatenate(unlabelled)) if unlabelled else np.empty(0, np.int64),
        known_classes=np.asarray(pool.known_classes) if pool.known_classes is not None else None,
    )


def long_tail_pool(
    rest: dict[int, np.ndarray], known: Sequence[int], ratio: float, order: str
) -> dict[int, np.ndarray]:
    """The first N_k of each known class's pool images, N_k on the long-tailed profile in
    class order (`same`) or reversed; N_1 is the largest head count every class can follow."""
    k = len(known)
    position = np.arange(k) if order == "same" else k - 1 - np.arange(k)
    available = np.array([len(rest[c]) for c in known], dtype=np.float64)
    scale = ratio ** (position / max(1, k - 1))
    head = float(np.min(available * scale))
    counts = long_tail_counts(head, ratio, k)[position]
    return {c: rest[c][: int(counts[i])] for i, c in enumerate(known)}


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
