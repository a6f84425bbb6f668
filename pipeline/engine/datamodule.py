"""Serving batches to Lightning: datasets indexable by a whole batch of rows, rank-aware batch
samplers, and the DataModule that turns uint8 batches into normalised (and, when training,
augmented) float tensors on the device.

Images live in memory as uint8 tensors; a batch is one fancy-indexing op, then it is moved to the
device, augmented per sample in one batched op and normalised there (no per-sample PIL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from pipeline.runtime import dist

# Test-time views: a float batch -> its augmented copies (the clean batch not included).
ViewsFn = Callable[[torch.Tensor], list[torch.Tensor]]


class Batches(torch.utils.data.Dataset):
    """Indexable by an array of rows: returns the whole batch in one indexing op."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> None:
        self.images, self.targets, self.weight = images, targets, weight
        self.index = index if index is not None else torch.arange(len(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        batch = {"image": self.images[rows_t], "index": self.index[rows_t]}
        if self.targets is not None:
            batch["target"] = self.targets[rows_t]
            batch["weight"] = self.weight[rows_t]
        return batch


class EpochBatches(torch.utils.data.Sampler):
    """Yields this rank's share of an epoch's batches (lists of rows).

    `make(rng)` builds the whole epoch's batches from a generator seeded by (seed, epoch), the
    same on every rank; rank r takes batches r, r + W, ... and every rank the same count, so DDP
    ranks never wait on each other and no sample is seen twice in a step. Lightning calls
    set_epoch each epoch, and a resumed run replays the same epochs.
    """

    def __init__(self, make: Callable[[np.random.Generator], list[np.ndarray]], seed: int) -> None:
        self.make, self.seed, self.epoch = make, seed, 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self._len = len(make(np.random.default_rng(0))) // self.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        batches = self.make(np.random.default_rng([self.seed, self.epoch]))
        return iter(batches[self.rank :: self.world][: self._len])


def shard_batches(n: int, batch_size: int) -> list[np.ndarray]:
    """This rank's contiguous share of rows 0..n-1 in batches: every row on exactly one rank,
    no padding (the ordinary DistributedSampler pads and so double-counts)."""
    mine = np.array_split(np.arange(n), dist.world_size())[dist.rank()]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


class ImageDataModule(L.LightningDataModule):
    """Serves in-memory batches and turns them into normalised (and, when training, augmented)
    float tensors on the device."""

    def __init__(
        self,
        mean: list[float],
        std: list[float],
        augment: nn.Module | None,
        seed: int,
        num_workers: int = 0,
        channels_last: bool = False,
        train: Batches | None = None,
        train_batches: Callable[[np.random.Generator], list[np.ndarray]] | None = None,
        test: Batches | None = None,
        predict: Batches | None = None,
        eval_batch_size: int = 1024,
        predict_views: ViewsFn | None = None,
    ) -> None:
        super().__init__()
        self.predict_views = predict_views
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment, self.seed, self.num_workers = augment, seed, num_workers
        self.channels_last = channels_last
        self.train_set, self.train_batches = train, train_batches
        self.test_set, self.predict_set, self.eval_batch_size = test, predict, eval_batch_size
        self._step = 0

    def _loader(self, dataset: Batches, sampler: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_set, EpochBatches(self.train_batches, self.seed))

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.test_set, shard_batches(len(self.test_set), self.eval_batch_size))

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        n = len(self.predict_set)
        return self._loader(self.predict_set, shard_batches(n, self.eval_batch_size))

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Our batches are flat dicts of tensors: move them directly (on CPU: nothing to move),
        # instead of Lightning's generic walk over any collection.
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if device.type == "cpu":
            return batch
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        images = batch["image"]
        if self.trainer is not None and self.trainer.training and self.augment is not None:
            # A generator per (seed, step, rank): augmentation is reproducible, also on resume.
            self._step += 1
            gen = torch.Generator().manual_seed(
                hash((self.seed, self.trainer.global_step, self._step, dist.rank())) % 2**62
            )
            x = self.augment(images, gen)
        else:
            x = images.float().div_(255)
        views = [x]
        if self.predict_views is not None and self.trainer and self.trainer.predicting:
            # Test-time augmentation for pseudo-labels: the clean image and fixed views.
            views += self.predict_views(x)
        views = [(v - self.mean.to(v.device)) / self.std.to(v.device) for v in views]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        batch = {**batch, "image": views[0]}
        if len(views) > 1:
            batch["views"] = views
        return batch
