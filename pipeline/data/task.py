"""A dataset split for self-training: what every stage works on."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from pipeline.data import load_data
from pipeline.data.arrays import DataBundle, ImageArrays, subset
from pipeline.data.splits import Splits, check_disjoint, make_splits, unlabelled_pool
from pipeline.runtime.rundir import RunDir


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
        """The unlabelled set's true labels (None where unknown): for reports, never training."""
        labels = self.unlabelled.labels
        return labels.numpy() if labels is not None else None


def prepare_task(data_cfg: DictConfig, seed: int, run: RunDir | None) -> Task:
    """Load the data, split it by `labels_per_class`, `val_per_class` and `seed`, check the
    splits do not overlap, and record them in run_dir/splits.npz. The val set is the
    `val_per_class` split or, with data.val_dir, that folder."""
    bundle = load_data(data_cfg, run)
    assert bundle.train.labels is not None
    splits = make_splits(
        bundle.train.labels.numpy(),
        data_cfg.get("labels_per_class"),
        int(data_cfg.get("val_per_class") or 0),
        seed,
        len(bundle.classes),
    )
    check_disjoint(labelled=splits.labelled, val=splits.val, unlabelled=splits.unlabelled)
    if run is not None and not run.exists(run / "splits.npz"):
        run.write_npz(run / "splits.npz", splits.arrays())
    val = subset(bundle.train, splits.val) if len(splits.val) else bundle.val
    return Task(
        bundle=bundle,
        splits=splits,
        labelled=subset(bundle.train, splits.labelled),
        unlabelled=unlabelled_pool(bundle, splits),
        test=bundle.test,
        val=val if val is not None and len(val) else None,
    )
