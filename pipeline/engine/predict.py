"""Predictions of a network over a dataset, keyed by sample index: each rank predicts its shard
and writes it to a file; rank 0 merges the files by index (never by order) and checks that every
index appears exactly once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig

from pipeline.engine.datamodule import ImageDataModule, ViewsFn
from pipeline.engine.module import LitClassifier
from pipeline.engine.trainer import build_trainer
from pipeline.runtime import dist
from pipeline.runtime.io import atomic_path, read_npz


class IndexedPredictionWriter(BasePredictionWriter):
    """Keeps this rank's predictions keyed by index and writes them to one file per rank."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.index: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.index.append(prediction["index"].cpu().numpy().astype(np.int64))
        self.probs.append(prediction["probs"].cpu().numpy().astype(np.float32))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        num_classes = pl_module.hparams.get("num_classes", 0)
        index = np.concatenate(self.index) if self.index else np.zeros(0, np.int64)
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, num_classes), np.float32)
        with atomic_path(self.out_dir / f"rank{dist.rank()}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, index=index, probs=probs)
        self.index, self.probs = [], []


def predict(
    cfg: DictConfig,
    data_cfg: DictConfig,
    net: torch.nn.Module,
    dataset: Any,
    work_dir: Path,
    views: ViewsFn | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The network's probabilities for every row of `dataset` (averaged over the clean image
    and `views`, when given). Returns (index, probs) on rank 0, None on the other ranks."""
    shard_dir = work_dir / "predict_shards"
    if dist.is_rank_zero() and shard_dir.exists():
        shutil.rmtree(shard_dir)  # left by a killed pass (maybe with other ranks): redo them all
    dist.barrier()
    writer = IndexedPredictionWriter(shard_dir)
    dm = ImageDataModule(
        mean=list(data_cfg.mean),
        std=list(data_cfg.std),
        augment=None,
        seed=0,
        num_workers=data_cfg.get("num_workers", 0),
        channels_last=cfg.trainer.get("channels_last", False),
        eval_batch_size=cfg.train.eval_batch_size,
        predict_views=views,
        predict=dataset,
    )
    module = LitClassifier(
        net,
        num_classes=int(data_cfg.num_classes),
        optimizer=instantiate(cfg.optimizer),
        hparams={"num_classes": int(data_cfg.num_classes)},
    )
    trainer = build_trainer(cfg.trainer, progress=cfg.progress, callbacks=[writer])
    trainer.predict(module, datamodule=dm, return_predictions=False)
    dist.barrier()
    result = None
    if dist.is_rank_zero():
        parts = [read_npz(shard_dir / f"rank{r}.npz") for r in range(dist.world_size())]
        index = np.concatenate([p["index"] for p in parts])
        probs = np.concatenate([p["probs"] for p in parts])
        n = len(dataset)
        if len(index) != n or not np.array_equal(np.sort(index), np.arange(n)):
            raise RuntimeError(f"predictions cover {len(np.unique(index))} of {n} samples once")
        shutil.rmtree(shard_dir)
        result = index, probs
    dist.barrier()
    return result
