"""The Lightning pieces: batched augmentation, the data module, the classifier module, the Trainer.

Images live in memory as uint8 tensors; a batch is one fancy-indexing op, then it is moved to the
device, augmented per sample in one batched op and normalised there (no per-sample PIL).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from pipeline import dist
from pipeline.artifacts import atomic_path

# Metric names, defined once for the module, the stages and the reports.
TRAIN_LOSS = "train/loss"
TEST_ACC = "test/acc"
TEST_COUNT = "test/count"


def affine(
    x: torch.Tensor, angle: torch.Tensor, s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor
) -> torch.Tensor:
    """Rotate (radians), scale by 1/s and shift (tx, ty, in [-1, 1] units) each image of a
    float (B, C, H, W) batch; the parameters are (B,) tensors. Outside the image is 0."""
    theta = torch.stack(
        [
            torch.stack([s * angle.cos(), -s * angle.sin(), tx], 1),
            torch.stack([s * angle.sin(), s * angle.cos(), ty], 1),
        ],
        1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchAugment(nn.Module):
    """Per-sample random affine (shift, rotation, scale), flip and cutout, for a whole batch at
    once, plus torchvision v2 RandAugment on small chunks of the uint8 batch when enabled."""

    def __init__(
        self,
        translate: float = 0.0,
        rotate: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        flip: bool = False,
        cutout: float = 0.0,
        randaugment_ops: int = 0,
        randaugment_magnitude: int = 9,
        chunk: int = 16,
    ) -> None:
        super().__init__()
        self.translate, self.rotate, self.scale = translate, rotate, tuple(scale)
        self.flip, self.cutout, self.chunk = flip, cutout, chunk
        self.randaugment = (
            v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)
            if randaugment_ops > 0
            else None
        )

    def forward(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, H, W) in [0, 1], augmented."""
        if self.randaugment is not None:
            # v2 transforms draw one set of ops per call: chunks give per-chunk randomness.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            images = torch.cat([self.randaugment(c) for c in images.split(self.chunk)])
        x = images.float().div_(255)
        b, _, h, w = x.shape

        def uniform(low: float, high: float, n: int = b) -> torch.Tensor:
            return (torch.rand(n, generator=gen) * (high - low) + low).to(x.device)

        if self.rotate or self.translate or self.scale != (1.0, 1.0):
            angle = uniform(-self.rotate, self.rotate) * math.pi / 180
            s = 1.0 / uniform(*self.scale)
            tx, ty = uniform(-2 * self.translate, 2 * self.translate, 2 * b).view(2, b)
            x = affine(x, angle, s, tx, ty)
        if self.flip:
            flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        if self.cutout > 0:
            half = self.cutout * h / 2
            cy, cx = uniform(0, h), uniform(0, w)
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            hole = ((ys - cy.view(b, 1, 1)).abs() < half) & ((xs - cx.view(b, 1, 1)).abs() < half)
            x = x.masked_fill(hole.unsqueeze(1), 0.0)
        return x


def fixed_views(
    x: torch.Tensor, views: int, augment: BatchAugment, seed: int = 0
) -> list[torch.Tensor]:
    """`views` augmented copies of a float batch for test-time augmentation: view v is one
    affine transform (and flip) drawn from `augment`'s ranges with seed (seed, v) and applied to
    every image alike, so an image's views do not depend on the batch it is in (the same
    predictions from 1 or N processes)."""
    out = []
    for v in range(views):
        gen = torch.Generator().manual_seed(hash((seed, v)) % 2**62)
        r = torch.rand(5, generator=gen)
        lo, hi = augment.scale
        params = [
            (r[0] * 2 - 1) * augment.rotate * math.pi / 180,  # angle
            1.0 / (lo + (hi - lo) * r[1]),  # inverse scale
            *((r[2:4] * 2 - 1) * 2 * augment.translate),  # tx, ty
        ]
        # The same transform for every image of the batch.
        y = affine(x, *(p.to(x.device).expand(len(x)) for p in params))
        if augment.flip and r[4] < 0.5:
            y = y.flip(3)
        out.append(y)
    return out


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
        augment: BatchAugment | None,
        seed: int,
        num_workers: int = 0,
        channels_last: bool = False,
        train: Batches | None = None,
        train_batches: Callable[[np.random.Generator], list[np.ndarray]] | None = None,
        test: Batches | None = None,
        predict: Batches | None = None,
        eval_batch_size: int = 1024,
        predict_views: int = 0,
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
        if (
            self.predict_views
            and self.augment is not None
            and self.trainer
            and self.trainer.predicting
        ):
            # Test-time augmentation for pseudo-labels: the clean image and fixed views.
            views += fixed_views(x, self.predict_views, self.augment, self.seed)
        views = [(v - self.mean.to(v.device)) / self.std.to(v.device) for v in views]
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        batch = {**batch, "image": views[0]}
        if len(views) > 1:
            batch["views"] = views
        return batch


def soft_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Weighted cross-entropy against target distributions (one-hot rows for hard labels)."""
    if smoothing:
        target = target * (1 - smoothing) + smoothing / target.shape[1]
    loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (weight * loss).mean()


class LitClassifier(L.LightningModule):
    """A thin LightningModule around a plain network (`net`): each step is a few lines."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        backbone_lr_scale: float = 1.0,
        frozen_modules: list[nn.Module] | None = None,
        compile: bool = False,
        hparams: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Plain containers only: the checkpoint must load with weights_only=True.
        self.save_hyperparameters(dict(hparams or {}))
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing, self.backbone_lr_scale = label_smoothing, backbone_lr_scale
        self.frozen_modules = list(frozen_modules or [])
        # The compiled wrapper is kept out of the module tree so state_dict keys stay plain.
        object.__setattr__(self, "_forward_net", torch.compile(net) if compile else net)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_count = SumMetric()  # each test sample must be counted exactly once
        self._loss_sum: torch.Tensor | float = 0.0  # this epoch's training loss, for its log
        self._loss_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_net(x)

    def train(self, mode: bool = True) -> LitClassifier:
        super().train(mode)
        for m in self.frozen_modules:  # frozen BatchNorm keeps its running statistics
            m.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning (>= 2.2) no longer calls .train() when fitting starts: put the module in
        # training mode here, which also puts the frozen BatchNorms back in eval mode. Here and
        # not only per epoch: a run resumed mid-epoch skips that epoch's on_train_epoch_start.
        self.train()

    def on_train_epoch_start(self) -> None:
        self.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = soft_cross_entropy(logits, batch["target"], batch["weight"], self.label_smoothing)
        # The epoch's mean loss is logged once at its end: a per-step self.log costs more than a
        # small model's step is worth keeping it for.
        self._loss_sum = self._loss_sum + loss.detach()
        self._loss_steps += 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self._loss_steps:
            mean = self._loss_sum / self._loss_steps
            self.log(TRAIN_LOSS, mean, on_epoch=True, prog_bar=True, sync_dist=True)
        self._loss_sum, self._loss_steps = 0.0, 0

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_acc.update(self(batch["image"]), batch["target"].argmax(1))
        self.test_count.update(torch.tensor(float(len(batch["image"])), device=self.device))
        self.log(TEST_ACC, self.test_acc, on_step=False, on_epoch=True)
        self.log(TEST_COUNT, self.test_count, on_step=False, on_epoch=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        # With test-time augmentation: the mean of the views' probabilities.
        views = batch.get("views", [batch["image"]])
        probs = sum(self(v).float().softmax(1) for v in views) / len(views)
        return {"index": batch["index"], "probs": probs}

    def configure_optimizers(self) -> Any:
        head = [
            p for n, p in self.net.named_parameters() if n.startswith("head.") and p.requires_grad
        ]
        body = [
            p
            for n, p in self.net.named_parameters()
            if not n.startswith("head.") and p.requires_grad
        ]
        optimizer = self.optimizer_factory(
            [{"params": body, "lr_scale": self.backbone_lr_scale}, {"params": head}]
        )
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, T_max=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename: a kill while
    saving last.ckpt leaves the previous last.ckpt intact. Loads with weights_only=True."""

    def save_checkpoint(
        self, checkpoint: dict, path: str | Path, storage_options: Any = None
    ) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class IndexedPredictionWriter(BasePredictionWriter):
    """Keeps this rank's predictions keyed by unlabelled index and writes them to one file per
    rank; rank 0 merges the files by index after a barrier (never by order)."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.index: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:  # noqa: E501
        self.index.append(prediction["index"].cpu().numpy().astype(np.int64))
        self.probs.append(prediction["probs"].cpu().numpy().astype(np.float32))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        num_classes = pl_module.hparams.get("num_classes", 0)
        index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, num_classes), np.float32)
        with atomic_path(self.out_dir / f"rank{dist.rank()}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=index, probs=probs)
        self.index, self.probs = [], []


def build_trainer(
    trainer_cfg: Mapping[str, Any],
    max_epochs: int = 1,
    ckpt_dir: Path | None = None,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
    root_dir: Path | None = None,
) -> L.Trainer:
    """The Lightning Trainer as the pipeline configures it. Devices, strategy and precision come
    from `trainer.*`; samplers are the pipeline's own (rank-aware), so Lightning's are off."""
    callbacks = list(callbacks or [])
    if ckpt_dir is not None:
        # Only last.ckpt, every epoch: what a killed run resumes from. (save_top_k=0 with
        # save_last=True writes nothing per epoch since Lightning 2.5: keep the latest instead.)
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False
            )
        )
    if progress:
        callbacks.append(RichProgressBar(leave=False))
    from pipeline.launch import lightning_settings

    # The strategy as named (a spawning ddp variant becomes ddp: the ranks exist already), and
    # SLURMEnvironment(auto_requeue=False) under SLURM tasks (pipeline.preemption requeues).
    settings = lightning_settings(trainer_cfg)
    return L.Trainer(
        accelerator=trainer_cfg.get("accelerator", "auto"),
        devices=trainer_cfg.get("devices", 1),
        strategy=settings["strategy"],
        num_nodes=trainer_cfg.get("num_nodes", 1),
        precision=trainer_cfg.get("precision", "32-true"),
        deterministic=trainer_cfg.get("deterministic", False),
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 50),
        max_epochs=max_epochs,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *settings["plugins"]],
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(root_dir) if root_dir else os.getcwd(),
    )
