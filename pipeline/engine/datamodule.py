"""Serving batches to Lightning: the DataModule that turns uint8 batches (engine/batches.py:
datasets indexable by a whole batch of rows, rank-aware batch samplers) into normalised (and,
when training, augmented) float tensors on the device.

A batch is one fancy-indexing op for images in memory, or read and decoded in DataLoader
workers for a streamed set; then it is moved to the device, augmented per sample in one batched
op and normalised there (no per-sample PIL).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from pipeline.config.schema import TrainConfig
from pipeline.data.arrays import ImageSet
from pipeline.data.decode import decode_batch
from pipeline.engine.batches import Batches, EpochBatches, shard_batches
from pipeline.errors import UserError
from pipeline.runtime import dist
from pipeline.runtime.seed import seed_global

# Test-time views: a float batch -> its augmented copies (the clean batch not included).
ViewsFn = Callable[[torch.Tensor], list[torch.Tensor]]


def resolve_workers(num_workers: Any, images: list[ImageSet | None]) -> int:
    """data.num_workers: a number, or "auto": none for sets in memory (indexing a tensor is
    faster than a worker's round trip), the cores of this rank for streamed sets (decoding)."""
    if num_workers not in (None, "auto"):
        return int(num_workers)
    if all(i is None or i.in_memory for i in images):
        return 0
    from pipeline.runtime.launch import available_cpus

    return max(1, min(8, available_cpus()))


class ImageDataModule(L.LightningDataModule):
    """Serves batches and turns them into normalised (and, when training, augmented) float
    tensors on the device. Unreadable images met in a streamed set stop the run naming the
    file (`on_bad_image="fail"`) or are dropped from the batch and counted (`"skip"`)."""

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
        val: Batches | None = None,
        predict: Batches | None = None,
        predict_batches: list[np.ndarray] | None = None,
        eval_batch_size: int = TrainConfig.eval_batch_size,
        predict_views: ViewsFn | None = None,
        on_bad_image: str = "fail",
        channels: int = 3,
        size: int = 32,
        pool_views: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        # Online pseudo-labelling: the weak and the strong view of each pool image of a
        # training batch (PairedBatches), made per sample on the device like `augment`.
        self.pool_views = pool_views
        self.channels, self.size = channels, size  # what images decoded on the device become
        self.predict_views = predict_views
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augment, self.seed, self.num_workers = augment, seed, num_workers
        self.channels_last = channels_last
        self.train_set, self.train_batches = train, train_batches
        self.test_set, self.predict_set, self.eval_batch_size = test, predict, eval_batch_size
        self.val_set = val
        self.predict_batches = predict_batches
        self.on_bad_image, self.num_bad = on_bad_image, 0
        self._micro_step, self._micro = -1, 0  # the batch within an optimizer step

    def _loader(self, dataset: Batches, sampler: Any) -> torch.utils.data.DataLoader:
        gpu = torch.cuda.is_available()
        return torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=gpu,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def train_batches_per_epoch(self) -> int:
        """This rank's training batches per epoch, known without building the loader (which
        the optimizer's schedule would otherwise do before a checkpoint is restored, fixing
        the resumed epoch's batches too early)."""
        return len(EpochBatches(self.train_batches, self.seed))

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        sampler = EpochBatches(
            self.train_batches,
            self.seed,
            steps_done=(lambda: trainer.global_step) if trainer is not None else None,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
        )
        return self._loader(self.train_set, sampler)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        # Like the test set: every val row on exactly one rank, none twice.
        return self._loader(self.val_set, shard_batches(len(self.val_set), self.eval_batch_size))

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.test_set, shard_batches(len(self.test_set), self.eval_batch_size))

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        batches = self.predict_batches
        if batches is None:
            batches = shard_batches(len(self.predict_set), self.eval_batch_size)
        return self._loader(self.predict_set, batches)

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
        training = self.trainer is not None and self.trainer.training
        predicting = self.trainer is not None and self.trainer.predicting
        return self._prepare(batch, training, predicting)

    def training_inputs(self, device: torch.device, max_batches: int) -> Iterator[torch.Tensor]:
        """The training images as a training step gets them (augmented, normalised): one epoch
        of this rank's batches, at most `max_batches` (e.g. to recompute BatchNorm statistics).
        The same images whether or not a Trainer is attached: the first epoch's batches, with
        the augmentation of optimizer steps 0, 1, ..."""
        loader = self._loader(self.train_set, EpochBatches(self.train_batches, self.seed))
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            batch = self.transfer_batch_to_device(batch, device, 0)
            yield self._prepare(batch, training=True, predicting=False, step=i)["image"]

    def _prepare(
        self, batch: dict, training: bool, predicting: bool, step: int | None = None
    ) -> dict:
        pool = {k[2:]: v for k, v in batch.items() if k.startswith("u_")}
        if pool:
            batch = {k: v for k, v in batch.items() if not k.startswith("u_")}
        if "encoded" in batch:
            batch = self._decode(batch)
        if "bad" in batch:
            batch = self._drop_bad(batch)
        images = batch["image"]
        if training:
            # Seeds per (seed, optimizer step, batch of that step, rank), so that a run resumed
            # from a checkpoint saved mid-epoch draws what the uninterrupted run drew: one for
            # the augmentation's generator, and torch's global generator (dropout, stochastic
            # depth), whose state no checkpoint holds.
            replay = step is not None or self.trainer is None  # outside a Trainer's fit
            step = (step or 0) if replay else self.trainer.global_step
            accumulate = 1 if replay else self.trainer.accumulate_grad_batches
            self._micro = self._micro + 1 if self._micro_step == step else 0
            self._micro_step = step
            count = step * accumulate + self._micro + 1  # from 1
            global_seed = hash((self.seed, step, count, dist.rank(), 1)) % 2**62
            seed_global(global_seed)  # (not torch.manual_seed: see seed_global)
        if training and self.augment is not None:
            gen = torch.Generator().manual_seed(hash((self.seed, step, count, dist.rank())) % 2**62)
            x = self.augment(images, gen)
        else:
            x = images.float().div_(255)
        views = [x]
        if self.predict_views is not None and predicting:
            # Test-time augmentation for pseudo-labels: the clean image and fixed views.
            views += self.predict_views(x)
        views = [self._normalise(v) for v in views]
        batch = {**batch, "image": views[0]}
        if len(views) > 1:
            batch["views"] = views
        if pool and training and self.pool_views is not None:
            batch.update(self._pool_views(pool, (self.seed, step, count, dist.rank())))
        return batch

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _pool_views(self, pool: dict, key: tuple) -> dict:
        """The pool part of a training batch: its weak and strong views (`u_weak`, `u_strong`),
        `u_index` and, where known, `u_truth`. Unreadable pool images are left out (or stop the
        run: data.on_bad_image)."""
        if "encoded" in pool:
            pool = self._decode(pool)
        if "bad" in pool:
            pool = self._drop_bad(pool)
        weak, strong = self.pool_views
        images = pool["image"]
        # Each view its own generator, seeded like the labelled batch's augmentation.
        x_weak = weak(images, torch.Generator().manual_seed(hash((*key, 2)) % 2**62))
        x_strong = strong(images, torch.Generator().manual_seed(hash((*key, 3)) % 2**62))
        out = {
            "u_weak": self._normalise(x_weak),
            "u_strong": self._normalise(x_strong),
            "u_index": pool["index"],
        }
        if "truth" in pool:
            out["u_truth"] = pool["truth"]
        return out

    def _decode(self, batch: dict) -> dict:
        """Decode a batch of files on the device (nvJPEG on a GPU)."""
        device = batch["index"].device
        images, bad = decode_batch(
            batch.pop("encoded"), batch.pop("ext"), self.channels, self.size, device
        )
        keys = batch.pop("keys")
        batch["image"] = images
        if bad:
            batch["bad"] = torch.tensor([pos for pos, _ in bad])
            batch["why"] = [f"{keys[pos]}: {why}" for pos, why in bad]
        return batch

    def _drop_bad(self, batch: dict) -> dict:
        """Stop on an unreadable image, or take it out of the batch (training: weight 0; else
        the batch keeps `num_bad`, `bad_index` and `bad_why` of the rows taken out)."""
        if self.on_bad_image != "skip":
            raise UserError(
                f"cannot read image {batch['why'][0]}; fix or delete it, "
                "or set data.on_bad_image=skip"
            )
        self.num_bad += len(batch["bad"])
        keep = torch.ones(len(batch["image"]), dtype=torch.bool)
        keep[batch["bad"].cpu()] = False
        if "weight" in batch:  # a training step keeps its shape: the images weigh nothing
            return {**batch, "weight": batch["weight"] * keep.to(batch["weight"])}
        dropped = batch["index"][batch["bad"].to(batch["index"].device)]
        keep = keep.to(batch["image"].device)
        kept = {
            k: v[keep] if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k not in ("bad", "why")
        }
        # What was dropped, for a writer that reports it (stage=predict's error rows): the
        # dropped rows' `index` and why each could not be read ("KEY (WHERE): reason").
        return {**kept, "num_bad": len(batch["bad"]), "bad_index": dropped, "bad_why": batch["why"]}
