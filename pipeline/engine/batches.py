"""Batches of rows for Lightning: datasets indexable by a whole batch of rows (a training set,
or a training set paired with the unlabelled pool), and the rank-aware batch samplers (the
resumable training epochs, the evaluation shards). The DataModule that serves them is
engine/datamodule.py.

A batch is one fancy-indexing op for images in memory, or read and decoded in DataLoader
workers for a streamed set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.data.arrays import ImageSet
from pipeline.runtime import dist


class Batches(torch.utils.data.Dataset):
    """Indexable by an array of rows: returns the whole batch (one indexing op for images in
    memory; one read and decode per image for a streamed set, in a DataLoader worker).

    `labels` are the rows' true labels (evaluation); `targets(rows)` the training targets
    (distributions, one-hot for hard labels) with a `weight` per row; `index` what a row is
    called in the predictions (default: the row)."""

    def __init__(
        self,
        images: ImageSet,
        labels: torch.Tensor | None = None,
        targets: Callable[[np.ndarray], torch.Tensor] | None = None,
        weight: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        encoded: bool = False,
    ) -> None:
        self.images, self.labels, self.targets, self.weight = images, labels, targets, weight
        self.index = index if index is not None else torch.arange(len(images))
        # Undecoded files, for decoding on the device (only sets read from disk have them).
        self.encoded = encoded and hasattr(images, "encoded")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: np.ndarray) -> dict[str, Any]:
        rows = np.asarray(rows, dtype=np.int64)
        rows_t = torch.from_numpy(rows)
        if self.encoded:
            data, exts, keys = self.images.encoded(rows)
            batch: dict[str, Any] = {"encoded": data, "ext": exts, "keys": keys}
            bad = []
        else:
            images, bad = self.images.load(rows)
            batch = {"image": images}
        batch["index"] = self.index[rows_t]
        if self.labels is not None:
            batch["label"] = self.labels[rows_t]
        if self.targets is not None:
            batch["target"] = self.targets(rows)
            batch["weight"] = self.weight[rows_t]
        if bad:  # unreadable images: the data module fails or drops them (data.on_bad_image)
            batch["bad"] = torch.tensor([pos for pos, _ in bad])
            batch["why"] = [why for _, why in bad]
        return batch


class PairedBatches(torch.utils.data.Dataset):
    """A training set and an unlabelled pool served together (online pseudo-labelling): indexed
    by a pair (training rows, pool rows), it returns the training batch with the pool's batch
    under `u_*` keys (`u_image` or `u_encoded`, `u_index`: the rows' positions in the pool, and
    `u_truth`: the pool's true labels where known, for diagnostics only, never a target)."""

    def __init__(self, train: Batches, pool: Batches) -> None:
        self.train, self.pool = train, pool
        self.images = train.images  # (what resolve_workers and the EMA's BatchNorm pass look at)

    def __len__(self) -> int:
        return len(self.train)

    def __getitem__(self, rows: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        train_rows, pool_rows = rows
        batch = self.train[train_rows]
        pool = self.pool[pool_rows]
        if "label" in pool:
            pool["truth"] = pool.pop("label")
        return {**batch, **{f"u_{k}": v for k, v in pool.items()}}


def with_pool(
    make: Callable[[np.random.Generator], list[np.ndarray]], pool_size: int, mu: int
) -> Callable[[np.random.Generator], list[tuple[np.ndarray, np.ndarray]]]:
    """Pairs each of an epoch's batches with `mu` x its size of pool rows: the pool is walked in
    seeded permutations (the next one starts where the last ended), drawn after the batches from
    the same (seed, epoch) generator, so a resumed epoch pairs its batches as before."""

    def paired(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        batches = make(rng)
        sizes = [mu * len(b) for b in batches]
        need = sum(sizes)
        order = np.concatenate(
            [rng.permutation(pool_size) for _ in range(-(-need // pool_size))]
        ) if need else np.zeros(0, np.int64)  # fmt: skip
        ends = np.cumsum(sizes)
        return [(b, order[e - n : e]) for b, n, e in zip(batches, sizes, ends, strict=True)]

    return paired


def _rows(batch: np.ndarray | tuple[np.ndarray, ...]) -> int:
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def _share(batch: Any, rank: int, world: int) -> Any:
    """Rank `rank`'s rows of a global batch (of each part of a paired batch)."""
    if isinstance(batch, tuple):
        return tuple(part[rank::world] for part in batch)
    return batch[rank::world]


class EpochBatches(torch.utils.data.Sampler):
    """Yields this rank's share of an epoch's global batches (arrays of rows).

    `make(rng)` builds the whole epoch's batches (each of `train.batch_size` rows, the global
    batch) from a generator seeded by (seed, epoch), the same on every rank; rank r takes rows
    r, r + W, ... of every batch, so W ranks take the same optimizer steps on the same samples as
    one process would, each with 1/W of the batch. Lightning calls set_epoch each epoch.

    `steps_done()`, when given, returns the optimizer steps trained so far and
    `accumulate` the batches per step: the epoch and the batches of it already trained follow
    from them, so a run resumed from a checkpoint saved mid-epoch (on a signal, or by time)
    goes on with the rest of that epoch's batches, in the same order, instead of starting the
    epoch over: it trains on exactly the samples an uninterrupted run would.
    """

    def __init__(
        self,
        make: Callable[[np.random.Generator], list[np.ndarray]],
        seed: int,
        steps_done: Callable[[], int] | None = None,
        accumulate: int = 1,
    ) -> None:
        self.make, self.seed, self.epoch = make, seed, 0
        self.steps_done, self.accumulate = steps_done, max(1, int(accumulate))
        self.rank, self.world = dist.rank(), dist.world_size()
        self._len = len(self._mine(make(np.random.default_rng(0))))

    def _mine(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        # A last batch smaller than the world (a tiny set's remainder) would leave a rank empty.
        return [_share(b, self.rank, self.world) for b in batches if _rows(b) >= self.world]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        epoch, skip = self.epoch, 0
        if self.steps_done is not None and self._len:
            per_epoch = -(-self._len // self.accumulate)  # optimizer steps per epoch
            epoch, done = divmod(self.steps_done(), per_epoch)
            skip = done * self.accumulate
        batches = self.make(np.random.default_rng([self.seed, epoch]))
        return iter(self._mine(batches)[skip : self._len])


def shard_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """This rank's contiguous share of rows 0..n-1 in batches: every row on exactly one rank,
    no padding (the ordinary DistributedSampler pads and so double-counts)."""
    mine = np.array_split(np.arange(n), dist.world_size())[dist.rank()]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
