"""A network's predictions over a set, as a map over shards: each rank predicts the shards it is
given, in order, and hands each finished shard to a writer (one file per shard, written
atomically by that rank), so memory holds one shard at a time and a killed pass redoes only the
shards without a file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.data.splits import network_classes
from pipeline.engine.batches import Batches
from pipeline.engine.datamodule import ViewsFn
from pipeline.engine.fit import datamodule
from pipeline.engine.module import LitClassifier
from pipeline.engine.trainer import build_trainer, channels_last
from pipeline.errors import UserError
from pipeline.runtime import dist
from pipeline.runtime.memory import release_free_memory


@dataclass
class Unreadable:
    """A shard's rows that could not be read (data.on_bad_image=skip): their index and why
    ("KEY (WHERE): reason"). len() is their count."""

    index: np.ndarray
    why: list[str]

    def __len__(self) -> int:
        return len(self.index)


# (shard number, index of its readable rows, their probabilities, its unreadable rows); with
# `extras` asked of predict_shards, also those per-row outputs of predict_step as keywords
# (e.g. energy=...).
WriteShard = Callable[..., None]
NO_SHARD = -1  # the batch of a rank that has no shard to predict


@dataclass(frozen=True)
class ShardPlan:
    """Rows 0..n-1 cut into `num_shards` contiguous shards of nearly equal size."""

    n: int
    num_shards: int

    def rows(self, shard: int) -> np.ndarray:
        size, extra = divmod(self.n, self.num_shards)
        start = shard * size + min(shard, extra)
        return np.arange(start, start + size + (shard < extra))


class ShardWriter(BasePredictionWriter):
    """Collects this rank's predictions of the current shard; when its last batch is in,
    calls `write` with them."""

    def __init__(
        self, shard_of_batch: list[int], write: WriteShard, extras: tuple[str, ...] = ()
    ) -> None:
        super().__init__(write_interval="batch")
        self.shard_of_batch, self.write, self.extras = shard_of_batch, write, extras
        self._reset()

    def _reset(self) -> None:
        self.index: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.extra: dict[str, list[np.ndarray]] = {name: [] for name in self.extras}
        self.bad_index: list[np.ndarray] = []
        self.bad_why: list[str] = []

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.index.append(prediction["index"].cpu().numpy().astype(np.int64))
        self.probs.append(prediction["probs"].float().cpu().numpy())
        for name in self.extras:
            self.extra[name].append(prediction[name].float().cpu().numpy())
        bad_index = prediction.get("bad_index")
        if bad_index is not None and len(bad_index):
            self.bad_index.append(bad_index.cpu().numpy().astype(np.int64))
            self.bad_why += list(prediction["bad_why"])
        shard = self.shard_of_batch[batch_idx]
        if shard == NO_SHARD:
            self._reset()
            return
        last = batch_idx + 1 == len(self.shard_of_batch)
        if last or self.shard_of_batch[batch_idx + 1] != shard:
            bad = Unreadable(np.concatenate([np.zeros(0, np.int64), *self.bad_index]), self.bad_why)
            extra = {name: np.concatenate(parts) for name, parts in self.extra.items()}
            self.write(shard, np.concatenate(self.index), np.concatenate(self.probs), bad, **extra)
            self._reset()
            release_free_memory()  # resident memory flat over the pass (runtime/memory.py)


def predict_shards(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    dataset: Batches,
    shards: dict[int, np.ndarray],
    write: WriteShard,
    views: ViewsFn | None = None,
    extras: tuple[str, ...] = (),
) -> None:
    """Predict `shards` ({shard number: its rows}) with `net`, averaging the clean image and
    `views` when given: every rank calls it with the same shards and takes shards r, r + W, ...;
    `write` receives each of this rank's shards as soon as it is done (and writes it from this
    rank), with the per-row `extras` of predict_step (e.g. "energy") as keywords. Returns when
    every rank is done; bad input met by any rank (UserError) is raised on every rank."""
    num_classes = network_classes(data.node)
    bs = int(cfg.train.eval_batch_size)
    batches, shard_of_batch = [], []
    mine = list(shards)[dist.rank() :: dist.world_size()]
    for shard, rows in ((s, shards[s]) for s in mine):
        for i in range(0, len(rows), bs):
            batches.append(rows[i : i + bs])
            shard_of_batch.append(shard)
    if not batches and len(dataset):
        # A rank without a shard still takes part (Lightning refuses an empty loader): it
        # predicts one row that no writer receives.
        batches, shard_of_batch = [np.arange(1)], [NO_SHARD]
    dm = datamodule(cfg, data, 0, None, predict=dataset, predict_batches=batches)
    dm.predict_views = views
    module = LitClassifier(
        net,
        num_classes=num_classes,
        optimizer=instantiate(cfg.optimizer),
        hparams={"num_classes": num_classes},
        channels_last=channels_last(cfg.trainer.args),
    )
    writer = ShardWriter(shard_of_batch, write, extras)
    trainer = build_trainer(cfg.trainer.args, progress=cfg.progress, callbacks=[writer])
    problem = None
    try:
        trainer.predict(module, datamodule=dm, return_predictions=False)
    except UserError as e:  # e.g. an unreadable image with data.on_bad_image=fail
        problem = e
    # A rank that stopped on bad input tells the others (which would wait for it forever or
    # fail with a traceback): every rank raises the same one-line error.
    problems = [p for p in dist.all_gather_object(problem and str(problem)) if p]
    if problems:
        raise UserError(problems[0]) from None


def predict(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    dataset: Batches,
    views: ViewsFn | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's probabilities in memory: (index, probs). For tests and small sets in one
    process; pseudo-labelling uses predict_shards."""
    index, probs, _ = predict_scores(cfg, data, net, dataset, views)
    return index, probs


def predict_scores(
    cfg: RunSpec,
    data: DataSpec,
    net: torch.nn.Module,
    dataset: Batches,
    views: ViewsFn | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's (index, probs, energy) in memory on rank 0 (empty on the others): small
    sets, e.g. the labelled images whose OOD scores set the pool's rejection threshold."""
    n = network_classes(data.node)
    out = [(np.zeros(0, np.int64), np.zeros((0, n), np.float32), np.zeros(0, np.float32))]

    def keep(shard: int, index: np.ndarray, probs: np.ndarray, bad: Unreadable, energy) -> None:
        out.append((index, probs, energy))

    plan = {0: np.arange(len(dataset))}
    predict_shards(cfg, data, net, dataset, plan, keep, views, extras=("energy",))
    return out[-1]
