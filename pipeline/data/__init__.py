"""Datasets and their splits.

`load_data(data.node)` (a data option's plain node, config.specs.DataSpec) dispatches on `data.name` through `LOADERS` and makes every set match
`data.image_size` and `data.channels`; `make_splits` carves the labelled, val and unlabelled
index sets out of the train set; `unlabelled_pool` is the unlabelled set whose positions are the
"unlabelled index" of pseudo-label files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.data import bundled, image_folder, torchvision_sets
from pipeline.data.arrays import DataBundle, ImageArrays, conform_arrays, subset
from pipeline.data.splits import Splits, check_disjoint, make_splits, unlabelled_pool
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.runtime.rundir import RunDir

log = logging.getLogger(__name__)

__all__ = [
    "DataBundle",
    "ImageArrays",
    "LOADERS",
    "Splits",
    "check_disjoint",
    "conform_arrays",
    "load_data",
    "make_splits",
    "subset",
    "unlabelled_pool",
]

LOADERS: dict[str, Callable[[dict[str, Any]], DataBundle]] = {
    "digits": bundled.load_digits,
    "mnist5k": bundled.load_mnist5k,
    "cifar10": torchvision_sets.load_cifar10,
    "cifar100": torchvision_sets.load_cifar100,
    "svhn": torchvision_sets.load_svhn,
    "stl10": torchvision_sets.load_stl10,
    "mnist": torchvision_sets.load_mnist,
    "fashion_mnist": torchvision_sets.load_fashion_mnist,
    "image_folder": image_folder.load_image_folder,
}


def load_data(cfg: Mapping, run: RunDir | None = None) -> DataBundle:
    """Load the dataset named by ``cfg["name"]`` (the ``data`` config node): in memory, or
    listed into manifests in the run dir and streamed (image_folder)."""
    cfg = _plain(cfg)
    name = cfg.get("name")
    if name not in LOADERS:
        raise UserError(f"unknown data.name={name!r}; use one of: {', '.join(sorted(LOADERS))}")
    channels = cfg.get("channels")
    if channels not in (None, 1, 3):
        raise UserError(f"data.channels must be 1 or 3, got {channels!r}")
    size = cfg.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"data.image_size must be a positive integer, got {size!r}")

    if name == "image_folder":
        bundle = image_folder.load_image_folder(cfg, run)
    else:
        bundle = LOADERS[name](cfg)

    # One place that makes every set match the configured input shape, so that e.g. digits (8x8)
    # and mnist5k (28x28) can share one model for pretraining / fine-tuning.
    for field in ("train", "test", "extra_unlabelled", "val"):
        arrays = getattr(bundle, field)
        if arrays is not None:
            setattr(bundle, field, conform_arrays(arrays, channels, size))

    num_classes = cfg.get("num_classes")
    if num_classes is not None and num_classes != len(bundle.classes):
        raise UserError(
            f"data.num_classes={num_classes} but {name} has {len(bundle.classes)} classes; "
            f"set data.num_classes={len(bundle.classes)}"
        )
    log.info(
        "loaded %s: train %d, test %d, extra unlabelled %d, val %s, image shape %s",
        name,
        len(bundle.train),
        len(bundle.test),
        len(bundle.extra_unlabelled) if bundle.extra_unlabelled is not None else 0,
        len(bundle.val) if bundle.val is not None else "-",
        (channels, size, size),
    )
    return bundle


def _plain(cfg: Mapping) -> dict[str, Any]:
    """A dict of the data node (plain values: DataSpec.node), so missing optional keys can be
    read with .get()."""
    return dict(cfg)
