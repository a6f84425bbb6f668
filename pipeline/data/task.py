"""A dataset split for self-training: what every stage works on."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config.pretraining import data_option
from pipeline.config.specs import DataSpec
from pipeline.data import load_data
from pipeline.data.arrays import DataBundle, ImageArrays, ImageSet, subset
from pipeline.data.splits import (
    Splits,
    check_disjoint,
    make_splits,
    pool_spec,
    remap_labels,
    unlabelled_pool,
)
from pipeline.data.streamed import concat
from pipeline.errors import UserError
from pipeline.runtime.rundir import RunDir

# Sets that hold the same images: one cannot be the other's foreign images.
SAME_IMAGES = ({"mnist", "mnist5k"},)


@dataclass
class Task:
    """One dataset, split into labelled, val, unlabelled and test sets."""

    bundle: DataBundle
    splits: Splits
    labelled: ImageArrays
    unlabelled: ImageArrays  # its labels are the truth kept aside for reporting only
    test: ImageArrays
    # What chooses checkpoints (train.select=best_val) and what the objective of a sweep is:
    # data.val_per_class images per class of the label budget, or data.val_dir; None: no val.
    val: ImageArrays | None = None
    # Open-set pools (data.open_set): per pool position 1 where the image is foreign (an
    # unknown class, or data.open_set.extra_pool), 0 where it is of a known class, -1 where
    # nobody knows; for metrics only, never training. None: a closed-set pool.
    pool_foreign: np.ndarray | None = None

    @property
    def open_set(self) -> bool:
        return self.pool_foreign is not None

    @property
    def val_source(self) -> str | None:
        """Where the val set comes from (the report says it), None without one."""
        if self.val is None:
            return None
        return "val_dir" if len(self.splits.val) == 0 else "val_per_class"

    @property
    def num_classes(self) -> int:
        return len(self.bundle.classes)

    def unlabelled_truth(self):
        """The unlabelled set's true labels (None where unknown): for reports, never training
        (scripts/ceiling_labels.py trains on them, on purpose, to measure a pool's ceiling)."""
        labels = self.unlabelled.labels
        return labels.numpy() if labels is not None else None


def prepare_task(data: DataSpec, seed: int, run: RunDir | None) -> Task:
    """Load the data, split it by `labels_per_class`, `val_per_class` and `seed`, check the
    splits do not overlap, and record them in run_dir/splits.npz. The val set is the
    `val_per_class` split or, with data.val_dir, that folder."""
    bundle = load_data(data.node, run)
    assert bundle.train.labels is not None
    splits = make_splits(
        bundle.train.labels.numpy(),
        data.labels_per_class,
        int(data.val_per_class or 0),
        seed,
        len(bundle.classes),
        pool_spec(data.node, len(bundle.classes)),
    )
    check_disjoint(labelled=splits.labelled, val=splits.val, unlabelled=splits.unlabelled)
    if run is not None and not run.exists(run / "splits.npz"):
        run.write_npz(run / "splits.npz", splits.arrays())
    foreign = None
    if splits.known_classes is not None:
        bundle, foreign = open_set_bundle(bundle, splits, data)
    val = subset(bundle.train, splits.val) if len(splits.val) else bundle.val
    return Task(
        bundle=bundle,
        splits=splits,
        labelled=subset(bundle.train, splits.labelled),
        unlabelled=unlabelled_pool(bundle, splits),
        test=bundle.test,
        val=val if val is not None and len(val) else None,
        pool_foreign=foreign,
    )


def open_set_bundle(
    bundle: DataBundle, splits: Splits, data: DataSpec
) -> tuple[DataBundle, np.ndarray]:
    """The bundle of an open-set pool: the known classes only (labels remapped to 0..K-1 in
    splits.known_classes order, test and val sets cut to them), the train set's unknown
    classes labelled -1, data.open_set.extra_pool's train images appended to the extra pool
    images; and per pool position whether its image is foreign (1), known (0) or untold (-1)."""
    known = splits.known_classes
    assert known is not None
    original = bundle.train.labels.numpy()
    foreign = [(~np.isin(original[splits.unlabelled], known)).astype(np.int8)]
    extra = [bundle.extra_unlabelled] if bundle.extra_unlabelled is not None else []
    if extra:
        foreign.append(np.full(len(extra[0]), -1, np.int8))  # e.g. STL-10's unlabelled split
    name = (data.node.get("open_set") or {}).get("extra_pool")
    if name:
        images = extra_pool_images(str(name), data)
        extra.append(images)
        foreign.append(np.ones(len(images), np.int8))
    out = dataclasses.replace(
        bundle,
        classes=[bundle.classes[c] for c in known],
        train=relabel(bundle.train, remap_labels(original, known)),
        test=known_only(bundle.test, known),
        val=known_only(bundle.val, known) if bundle.val is not None else None,
        extra_unlabelled=concat(extra) if extra else None,
    )
    return out, np.concatenate(foreign)


def relabel(images: ImageSet, labels: np.ndarray) -> ImageSet:
    """The same images with other labels (a shallow copy: the pixels are shared)."""
    out = copy.copy(images)
    out.labels = torch.as_tensor(labels, dtype=torch.int64)
    return out


def known_only(images: ImageSet, known: np.ndarray) -> ImageSet:
    """The images of the known classes, labelled 0..K-1 (a test or val set)."""
    labels = images.labels.numpy()
    kept = images.subset(np.flatnonzero(np.isin(labels, known)))
    return relabel(kept, remap_labels(kept.labels.numpy(), known))


def extra_pool_images(name: str, data: DataSpec) -> ImageSet:
    """The train images of data=NAME, shaped like the target (image_size, channels; the
    target's mean and std normalise them in the batches), labels -1: foreign to the task."""
    target = str(data.name)
    if name == target or any({name, target} <= group for group in SAME_IMAGES):
        raise UserError(
            f"data.open_set.extra_pool={name} holds the target's own images (data={target}); "
            "name another set (e.g. digits for mnist5k)"
        )
    settings: dict[str, Any] = {
        "image_size": data.image_size,
        "channels": data.channels,
        "root": data.node.get("root", "data"),
        "download": bool(data.node.get("download", False)),
    }
    bundle = load_data({**data_option(name, "data.open_set.extra_pool"), **settings})
    return relabel(bundle.train, np.full(len(bundle.train), -1, np.int64))
