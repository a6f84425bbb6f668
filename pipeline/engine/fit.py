"""Training one network on a training set, and testing it: the Lightning calls every stage uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.consistency import ConsistencySpec
from pipeline.consistency import build as build_consistency
from pipeline.data.arrays import ImageSet
from pipeline.engine.batches import Batches, PairedBatches, with_pool
from pipeline.engine.datamodule import ImageDataModule, resolve_workers
from pipeline.engine.ema import EMA
from pipeline.engine.features import FeatureDataModule, is_features
from pipeline.engine.losses import logit_offset
from pipeline.engine.module import TEST_ACC, TEST_COUNT, VAL_ACC, LitClassifier
from pipeline.engine.trainer import (
    build_trainer,
    channels_last,
)
from pipeline.engine.training_set import TrainingSet, mixed_batches
from pipeline.errors import UserError
from pipeline.runtime import dist
from pipeline.runtime.io import load_checkpoint
from pipeline.runtime.memory import large_blocks_from_the_heap

log = logging.getLogger("pipeline")


def datamodule(
    cfg: RunSpec,
    data: DataSpec,
    seed: int,
    augment: torch.nn.Module | None,
    pool_views: tuple[torch.nn.Module, torch.nn.Module] | None = None,
    **sets: Any,
) -> ImageDataModule:
    datasets = [v.images for v in sets.values() if isinstance(v, Batches)]
    datasets += [v.pool.images for v in sets.values() if isinstance(v, PairedBatches)]
    # Cached features (model.cache_features) are served as they are, from memory maps.
    features = bool(datasets) and all(is_features(d) for d in datasets)
    workers = resolve_workers(data.num_workers, datasets)
    return (FeatureDataModule if features else ImageDataModule)(
        mean=list(data.mean),
        std=list(data.std),
        augment=augment,
        seed=seed,
        num_workers=0 if features else workers,
        channels_last=channels_last(cfg.trainer.args),
        eval_batch_size=cfg.train.eval_batch_size,
        on_bad_image=str(data.on_bad_image or "fail"),
        channels=int(data.channels),
        size=int(data.image_size or 0),
        pool_views=pool_views,
        **sets,
    )


def batches(data: DataSpec, images: ImageSet, **fields: Any) -> Batches:
    """A set served in batches; its files decoded on the device with data.decode_on=device."""
    return Batches(images, encoded=data.decode_on == "device", **fields)


def training_batches(
    train_set: TrainingSet, cfg: RunSpec, epochs: int
) -> Callable[[np.random.Generator], list[np.ndarray]]:
    """The epoch's global batches (train.batch_size rows each, split among the ranks): at least
    train.min_steps optimizer steps over the whole training, so a teacher on 40 labels still
    gets enough updates."""
    n_lab = train_set.num_labelled
    n_ps = len(train_set) - n_lab
    bs = cfg.train.batch_size
    if bs % dist.world_size():
        raise UserError(
            f"train.batch_size={bs} (the global batch) does not divide among "
            f"{dist.world_size()} processes; pass a multiple of {dist.world_size()}"
        )
    frac = cfg.pseudo_label.labelled_fraction
    min_batches = math.ceil(cfg.train.min_steps / max(1, epochs))

    def make(rng: np.random.Generator) -> list[np.ndarray]:
        return mixed_batches(n_lab, n_ps, bs, frac, rng, min_batches)

    return make


@dataclass(frozen=True)
class OnlinePool:
    """The unlabelled pool a training labels online (consistency=...): its images, the method,
    and the weak and strong views made of each pool image. `truth` (the pool's true labels,
    -1 unknown) feeds the diagnostics only, never a loss."""

    images: ImageSet
    spec: ConsistencySpec
    weak: torch.nn.Module
    strong: torch.nn.Module
    truth: torch.Tensor | None = None


@dataclass
class FitResult:
    """What a training did: its optimizer steps, one record per epoch (epoch, train_loss,
    val_accuracy, images_per_s) and which weights it kept: the last epoch's, or (selected_by
    "val") those of the epoch with the best val accuracy."""

    steps: int
    epochs: list[dict[str, Any]] = field(default_factory=list)
    selected_by: str = "last"
    selected_epoch: int | None = None

    @property
    def images_per_s(self) -> float | None:
        rates = [e["images_per_s"] for e in self.epochs if e.get("images_per_s")]
        return round(sum(rates) / len(rates), 1) if rates else None

    def record(self) -> dict[str, Any]:
        """The training's part of a round's metrics.json (and of its model.ckpt)."""
        out: dict[str, Any] = {"selected_by": self.selected_by, "epochs": self.epochs}
        if self.selected_epoch is not None:
            out["selected_epoch"] = self.selected_epoch
        if self.images_per_s is not None:
            out["train_images_per_s"] = self.images_per_s
        return out


def fit(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    images: ImageSet,
    train_set: TrainingSet,
    work_dir: Path,
    seed: int,
    epochs: int,
    hparams: dict[str, Any],
    augment: torch.nn.Module | None,
    lr_scale: float = 1.0,
    frozen: list[torch.nn.Module] | None = None,
    val: ImageSet | None = None,
    select: str = "last",
    loggers: list[Logger] | None = None,
    log_prefix: str = "",
    pool: OnlinePool | None = None,
    layer_decay: float | None = None,
) -> FitResult:
    """Train `net` on a TrainingSet (images given in TrainingSet row order), with `augment` as
    the per-batch noise, evaluating `val` (if given) after every epoch. Resumes from
    work_dir/checkpoints/last.ckpt when a killed run left one. `select="best_val"` leaves in
    `net` the weights of the epoch with the best val accuracy (Lightning's ModelCheckpoint on
    VAL_ACC; the first such epoch on ties), "last" those of the last epoch. Test accuracy is
    never looked at here. Per-epoch metrics go to `loggers` named `log_prefix` + metric. With
    a `pool`, every batch also carries `consistency.mu` pool images per training image, and the
    online pseudo-label loss of `pool.spec.method` is added to the supervised one."""
    L.seed_everything(seed, workers=True, verbose=False)
    if epochs == 0:
        return FitResult(0)
    if select == "best_val" and val is None:
        raise UserError(
            "train.select=best_val needs a val split (data.val_per_class or data.val_dir)"
        )
    train_data = batches(
        data, images, targets=train_set.target_rows, weight=torch.from_numpy(train_set.weight)
    )
    val_data = batches(data, val, labels=val.labels) if val is not None else None
    make = training_batches(train_set, cfg, epochs)
    method = None
    if pool is not None:
        method = build_consistency(pool.spec, train_set.num_classes, len(pool.images))
        train_data = PairedBatches(train_data, batches(data, pool.images, labels=pool.truth))
        make = with_pool(make, len(pool.images), pool.spec.mu)
    dm = datamodule(
        cfg,
        data,
        seed,
        augment,
        pool_views=(pool.weak, pool.strong) if pool is not None else None,
        train=train_data,
        train_batches=make,
        val=val_data,
    )
    offset = None
    if cfg.train.logit_adjust:  # engine/losses.py: the class prior its batches have
        prior = train_set.class_prior(cfg.train.batch_size, cfg.pseudo_label.labelled_fraction)
        offset = logit_offset(prior, cfg.train.logit_adjust)
    module = LitClassifier(
        net,
        num_classes=train_set.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler)
        if cfg.scheduler and cfg.scheduler.get("_target_")
        else None,
        label_smoothing=cfg.train.label_smoothing,
        backbone_lr_scale=lr_scale,
        frozen_modules=frozen,
        compile=cfg.trainer.compile,
        hparams=hparams,
        log_prefix=log_prefix,
        channels_last=channels_last(cfg.trainer.args),
        consistency=method,
        consistency_weight=pool.spec.weight if pool is not None else 1.0,
        layer_decay=layer_decay,
        logit_offset=offset,
    )
    ckpt_dir = work_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"  # written by build_trainer's LastCheckpoint
    callbacks: list[L.Callback] = []
    best = None
    if select == "best_val":
        best = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best",
            monitor=VAL_ACC,
            mode="max",  # a later epoch replaces the kept one only when strictly better
            save_top_k=1,
            save_weights_only=True,
            enable_version_counter=False,
            save_on_train_epoch_end=False,  # when VAL_ACC of the epoch is known
        )
        callbacks.append(best)
    ema = cfg.train.ema_decay
    if ema is not None:  # the network ends with its averaged weights (engine/ema.py)
        callbacks.append(EMA(float(ema)))
    trainer = build_trainer(
        cfg.trainer.args,
        max_epochs=epochs,
        ckpt_dir=ckpt_dir,
        ckpt_every_s=cfg.train.checkpoint_every_s,
        progress=cfg.progress,
        callbacks=callbacks,
        root_dir=work_dir,
        loggers=loggers,
        validate=val is not None,
        stop_on_signal=False,  # its LastCheckpoint saves and stops
    )
    if last.exists():
        log.info("resuming training from %s", last)
    # A pool's batches are (1 + 2 mu) x larger: their activations come from the heap, reused
    # step after step, not from fresh mappings (runtime/memory.py).
    with large_blocks_from_the_heap() if pool is not None else nullcontext():
        trainer.fit(
            module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True
        )
    result = FitResult(int(trainer.global_step), [dict(e) for e in module.epochs])
    if best is not None and best.best_model_path:
        kept = load_checkpoint(best.best_model_path)  # (weights_only, checksum checked)
        module.load_state_dict(kept["state_dict"])  # into `net`, which the module wraps
        result.selected_by, result.selected_epoch = "val", int(kept["epoch"])
        log.info(
            "kept the weights of epoch %d (best val accuracy %.4f)",
            result.selected_epoch,
            float(best.best_model_score),
        )
    elif result.epochs:
        result.selected_epoch = int(result.epochs[-1]["epoch"])
    return result


def evaluate(
    cfg: RunSpec, data: DataSpec, net: torch.nn.Module, test: ImageSet, split: str = "test"
) -> dict[str, Any]:
    """Accuracy on a labelled set (the test set, or split="val"), each sample counted exactly
    once (also under DDP); unreadable images (data.on_bad_image=skip) are counted apart. Keys:
    `{split}_accuracy`, `num_{split}`; for the test set also `per_class_recall` (None for a
    class it does not hold) and `balanced_accuracy` (their mean over the classes it holds).
    The network's classes are the known ones with an open-set pool (data.open_set)."""
    from pipeline.data.splits import network_classes

    assert test.labels is not None
    num_classes = network_classes(data.node)
    dm = datamodule(cfg, data, 0, None, test=batches(data, test, labels=test.labels))
    module = LitClassifier(
        net,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        channels_last=channels_last(cfg.trainer.args),
    )
    trainer = build_trainer(cfg.trainer.args, progress=cfg.progress)
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    count = int(round(out[TEST_COUNT]))
    bad = int(dist.all_reduce_sum(dm.num_bad))
    if count + bad != len(test):
        raise RuntimeError(f"evaluation counted {count} {split} samples, expected {len(test)}")
    metrics: dict[str, Any] = {f"{split}_accuracy": float(out[TEST_ACC]), f"num_{split}": count}
    if split == "test":
        recall = module.test_per_class_recall or []
        held = [r for r in recall if r is not None]
        metrics["balanced_accuracy"] = sum(held) / len(held) if held else None
        metrics["per_class_recall"] = recall
    if bad:
        metrics[f"num_bad_{split}_images"] = bad
    return metrics
