"""Training one network on a training set, and testing it: the Lightning calls every stage uses."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from pipeline.data.arrays import ImageSet
from pipeline.engine.datamodule import Batches, ImageDataModule, resolve_workers
from pipeline.engine.ema import EMA
from pipeline.engine.module import TEST_ACC, TEST_COUNT, LitClassifier
from pipeline.engine.trainer import build_trainer
from pipeline.errors import UserError
from pipeline.runtime import dist
from pipeline.runtime.preemption import CheckpointOnSignal
from pipeline.selftrain.merge import TrainingSet, mixed_batches

log = logging.getLogger("pipeline")


def datamodule(
    cfg: DictConfig, data_cfg: DictConfig, seed: int, augment: torch.nn.Module | None, **sets: Any
) -> ImageDataModule:
    datasets = [v.images for v in sets.values() if isinstance(v, Batches)]
    return ImageDataModule(
        mean=list(data_cfg.mean),
        std=list(data_cfg.std),
        augment=augment,
        seed=seed,
        num_workers=resolve_workers(data_cfg.get("num_workers", "auto"), datasets),
        channels_last=cfg.trainer.get("channels_last", False),
        eval_batch_size=cfg.train.eval_batch_size,
        on_bad_image=str(data_cfg.get("on_bad_image") or "fail"),
        channels=int(data_cfg.channels),
        size=int(data_cfg.image_size or 0),
        **sets,
    )


def batches(data_cfg: DictConfig, images: ImageSet, **fields: Any) -> Batches:
    """A set served in batches; its files decoded on the device with data.decode_on=device."""
    return Batches(images, encoded=data_cfg.get("decode_on", "workers") == "device", **fields)


def training_batches(
    train_set: TrainingSet, cfg: DictConfig, epochs: int
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


def fit(
    cfg: DictConfig,
    data_cfg: DictConfig,
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
) -> int:
    """Train `net` on a TrainingSet (images given in TrainingSet row order), with `augment` as
    the per-batch noise. Resumes from work_dir/checkpoints/last.ckpt when a killed run left one.
    Returns the number of optimizer steps taken."""
    L.seed_everything(seed, workers=True, verbose=False)
    if epochs == 0:
        return 0
    data = batches(
        data_cfg, images, targets=train_set.target_rows, weight=torch.from_numpy(train_set.weight)
    )
    dm = datamodule(
        cfg,
        data_cfg,
        seed,
        augment,
        train=data,
        train_batches=training_batches(train_set, cfg, epochs),
    )
    module = LitClassifier(
        net,
        num_classes=train_set.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler)
        if cfg.get("scheduler") and cfg.scheduler.get("_target_")
        else None,
        label_smoothing=cfg.train.label_smoothing,
        backbone_lr_scale=lr_scale,
        frozen_modules=frozen,
        compile=cfg.trainer.get("compile", False),
        hparams=hparams,
    )
    ckpt_dir = work_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    callbacks: list[L.Callback] = [CheckpointOnSignal(last)]  # "time is up": save, stop, requeue
    ema = cfg.train.get("ema_decay")
    if ema is not None:  # the network ends with its averaged weights (engine/ema.py)
        callbacks.append(EMA(float(ema)))
    trainer = build_trainer(
        cfg.trainer,
        max_epochs=epochs,
        ckpt_dir=ckpt_dir,
        ckpt_every_s=cfg.train.get("checkpoint_every_s"),
        progress=cfg.progress,
        callbacks=callbacks,
        root_dir=work_dir,
    )
    if last.exists():
        log.info("resuming training from %s", last)
    trainer.fit(
        module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True
    )
    return int(trainer.global_step)


def evaluate(
    cfg: DictConfig, data_cfg: DictConfig, net: torch.nn.Module, test: ImageSet
) -> dict[str, float]:
    """Test accuracy, each test sample counted exactly once (also under DDP); unreadable test
    images (data.on_bad_image=skip) are counted apart."""
    assert test.labels is not None
    num_classes = int(data_cfg.num_classes)
    dm = datamodule(cfg, data_cfg, 0, None, test=batches(data_cfg, test, labels=test.labels))
    module = LitClassifier(net, num_classes=num_classes, optimizer=instantiate(cfg.optimizer))
    trainer = build_trainer(cfg.trainer, progress=cfg.progress)
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    count = int(round(out[TEST_COUNT]))
    bad = int(dist.all_reduce_sum(dm.num_bad))
    if count + bad != len(test):
        raise RuntimeError(f"evaluation counted {count} test samples, expected {len(test)}")
    metrics = {"test_accuracy": float(out[TEST_ACC]), "num_test": count}
    if bad:
        metrics["num_bad_test_images"] = bad
    return metrics
