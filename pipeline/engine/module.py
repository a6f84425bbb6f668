"""The LightningModule: a thin wrapper around a plain network (`net`), each step a few lines."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

from pipeline.consistency import ConsistencyMethod
from pipeline.engine.losses import PoolLoss, RankSync
from pipeline.models.finetune import param_groups

# Metric names, defined once for the module, the stages, the loggers and the reports. Per-epoch
# metrics reach the loggers prefixed with their step (`round_1/val/acc`, step = epoch).
TRAIN_LOSS = "train/loss"
IMAGES_PER_S = "train/images_per_s"
VAL_ACC = "val/acc"  # what ModelCheckpoint monitors for train.select=best_val
VAL_COUNT = "val/count"
TEST_ACC = "test/acc"
TEST_COUNT = "test/count"
HISTORY = "pipeline_epochs"  # the per-epoch record in a checkpoint (plain containers)
CONSISTENCY_STATE = "pipeline_consistency"  # the online pseudo-labelling method's state_dict
# Online pseudo-labelling (consistency=...), per epoch: the share of the pool's images whose
# pseudo-label was kept (weight for SoftMatch), the accuracy of the kept ones where the truth is
# known, and each class's threshold at the epoch's end (`.../threshold_<c>`).
MASK_RATE = "consistency/mask_rate"
MASKED_PSEUDO_ACC = "consistency/pseudo_acc"
CLASS_THRESHOLD = "consistency/threshold_"


def merge_equal_param_groups(checkpoint: dict[str, Any]) -> None:
    """A checkpoint whose optimizer kept body and head in two groups with the same settings
    (written before configure_optimizers made one group of them), as one group: the same
    parameter ids in the same order, each parameter's state unchanged, and the schedule's
    per-group lists cut to one entry. Lightning restores the optimizer after this hook."""
    for opt in checkpoint.get("optimizer_states", []):
        groups = opt.get("param_groups", [])
        if len(groups) != 2:
            continue
        settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        if settings[0] != settings[1]:
            return  # not two copies of one group: leave it for the optimizer to refuse
        opt["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
    for sched in checkpoint.get("lr_schedulers", []):
        for key in ("base_lrs", "_last_lr"):
            if isinstance(sched.get(key), list) and len(sched[key]) == 2:
                sched[key] = sched[key][:1]


class LitClassifier(PoolLoss, L.LightningModule):
    """A thin LightningModule around a plain network (`net`): each step is a few lines (the
    pool's, with consistency=: engine/losses.py)."""

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
        log_prefix: str = "",
        channels_last: bool = False,
        consistency: ConsistencyMethod | None = None,
        consistency_weight: float = 1.0,
        layer_decay: float | None = None,
        logit_offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        # Plain containers only: the checkpoint must load with weights_only=True. Not sent to the
        # loggers: the run logs its whole config once (engine/loggers.py), not once per round.
        self.save_hyperparameters(dict(hparams or {}), logger=False)
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing, self.backbone_lr_scale = label_smoothing, backbone_lr_scale
        self.layer_decay = layer_decay
        self.frozen_modules = list(frozen_modules or [])
        if channels_last:
            # The conv weights in NHWC: with grayscale input (one channel, for which both layouts
            # are the same tensor) only the weights tell the kernels which layout to use.
            net.to(memory_format=torch.channels_last)
        # The compiled wrapper is kept out of the module tree so state_dict keys stay plain.
        object.__setattr__(self, "_forward_net", torch.compile(net) if compile else net)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_count = SumMetric()  # each test sample must be counted exactly once
        # Per class: true positives and support of the test set (summed over the ranks: each
        # sample counted once), for per-class recall and balanced accuracy (on_test_epoch_end).
        self.test_stats = MulticlassStatScores(num_classes=num_classes, average=None)
        self.test_per_class_recall: list[float | None] | None = None
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_count = SumMetric()
        self.log_prefix = log_prefix
        self._loss_sum: torch.Tensor | float = 0.0  # this epoch's training loss, for its log
        self._loss_steps = 0
        self._images = 0  # this epoch's training images on this rank, and their time
        self._epoch_start: float | None = None
        self._last_batch_end: float | None = None
        self._val_acc: float | None = None  # this epoch's val accuracy, once validated
        # One entry per finished epoch: epoch, train_loss, val_accuracy, images_per_s. Kept in
        # the checkpoints, so a resumed training still has the epochs before the kill.
        self.epochs: list[dict[str, Any]] = []
        # Online pseudo-labelling on the pool. Its state (per-class thresholds, running means,
        # FlexMatch's record per pool image) is saved in the checkpoints (CONSISTENCY_STATE), so
        # a resumed training continues it exactly. Kept out of the module tree: DDP would
        # broadcast its buffers every step (the ranks already agree: the method syncs its
        # statistics), and a `-true` precision would cast its float32 statistics.
        object.__setattr__(self, "consistency", consistency)
        self.consistency_weight = consistency_weight
        # train.logit_adjust: added to the logits in the training loss only (engine/losses.py).
        # A buffer, so it follows the module to its device; not persistent: no checkpoint
        # holds it, and a resumed training recomputes it from its training set.
        self._logit_offset: torch.Tensor | None
        self.register_buffer("_logit_offset", logit_offset, persistent=False)
        self._sync = RankSync(self)
        self._pool_stats: torch.Tensor | float = 0.0  # seen, kept, kept with truth, right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_net(x)

    def train(self, mode: bool = True) -> LitClassifier:
        super().train(mode)
        if self.consistency is not None:  # (its state is updated in training mode only)
            self.consistency.train(mode)
        for m in self.frozen_modules:  # frozen BatchNorm keeps its running statistics
            m.eval()
        return self

    def on_fit_start(self) -> None:
        if self.consistency is not None:
            self.consistency.to(self.device)

    def on_train_start(self) -> None:
        # Lightning (>= 2.2) no longer calls .train() when fitting starts: put the module in
        # training mode here, which also puts the frozen BatchNorms back in eval mode. Here and
        # not only per epoch: a run resumed mid-epoch skips that epoch's on_train_epoch_start.
        self.train()

    def on_train_epoch_start(self) -> None:
        self.train()
        self._epoch_start, self._images, self._val_acc = time.perf_counter(), 0, None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._epoch_start is None:  # resumed mid-epoch: on_train_epoch_start was skipped
            self._epoch_start = time.perf_counter()
        if self.consistency is not None and len(batch.get("u_weak", ())):
            loss = self._step_with_pool(batch)
        else:
            loss = self._supervised_loss(self(batch["image"]), batch)
        # The epoch's mean loss is logged once at its end: a per-step self.log costs more than a
        # small model's step is worth keeping it for.
        self._loss_sum = self._loss_sum + loss.detach()
        self._loss_steps += 1
        self._images += len(batch["image"])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._last_batch_end = time.perf_counter()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["image"]):  # (a batch of unreadable images only is empty)
            self.val_acc.update(self(batch["image"]), batch["label"])
        self.val_count.update(torch.tensor(float(len(batch["image"])), device=self.device))

    def on_validation_epoch_end(self) -> None:
        # compute() reduces over the ranks: each val row is on exactly one rank (shard_batches).
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.val_count.reset()
        self._val_acc = float(acc)
        # (already the same on every rank; sync_dist only keeps Lightning from warning)
        self.log(VAL_ACC, acc, on_epoch=True, prog_bar=True, logger=False, sync_dist=True)

    def on_train_epoch_end(self) -> None:
        """The epoch's record: mean training loss, val accuracy (validation ran before this
        hook), images per second; to the progress bar, the checkpoint and the loggers."""
        strategy = self.trainer.strategy
        record: dict[str, Any] = {"epoch": int(self.current_epoch)}
        if self._loss_steps:
            mean = strategy.reduce(self._loss_sum / self._loss_steps, reduce_op="mean")
            self.log(TRAIN_LOSS, mean, on_epoch=True, prog_bar=True, logger=False, sync_dist=True)
            record["train_loss"] = float(mean)
        if self._val_acc is not None:
            record["val_accuracy"] = self._val_acc
        if self._epoch_start is not None and self._last_batch_end is not None:
            images = strategy.reduce(
                torch.tensor(float(self._images), device=self.device), reduce_op="sum"
            )
            seconds = max(self._last_batch_end - self._epoch_start, 1e-9)
            record["images_per_s"] = round(float(images) / seconds, 1)
        if self.consistency is not None:
            record.update(self._pool_record())
        self.epochs.append(record)
        self._loss_sum, self._loss_steps, self._epoch_start = 0.0, 0, None
        names = {
            "train_loss": TRAIN_LOSS,
            "val_accuracy": VAL_ACC,
            "images_per_s": IMAGES_PER_S,
            "mask_rate": MASK_RATE,
            "masked_pseudo_accuracy": MASKED_PSEUDO_ACC,
        }
        metrics = {f"{self.log_prefix}{names[k]}": v for k, v in record.items() if k in names}
        for c, t in enumerate(record.get("class_thresholds", [])):
            metrics[f"{self.log_prefix}{CLASS_THRESHOLD}{c}"] = t
        for logger in self.loggers:  # (none on ranks other than 0)
            logger.log_metrics(metrics, step=record["epoch"])
            logger.save()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HISTORY] = [dict(e) for e in self.epochs]
        if self.consistency is not None:
            checkpoint[CONSISTENCY_STATE] = self.consistency.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epochs = [dict(e) for e in checkpoint.get(HISTORY, [])]
        if self.consistency is not None and CONSISTENCY_STATE in checkpoint:
            self.consistency.load_state_dict(checkpoint[CONSISTENCY_STATE])
        if self.one_param_group:
            merge_equal_param_groups(checkpoint)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["image"]):  # (a batch of unreadable images only is empty)
            logits = self(batch["image"])
            self.test_acc.update(logits, batch["label"])
            self.test_stats.update(logits, batch["label"])
        self.test_count.update(torch.tensor(float(len(batch["image"])), device=self.device))
        self.log(TEST_ACC, self.test_acc, on_step=False, on_epoch=True)
        self.log(TEST_COUNT, self.test_count, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        # Every rank computes (the states are summed over the ranks); None: a class the set
        # does not hold.
        stats = self.test_stats.compute()  # (classes, [tp, fp, tn, fn, support])
        tp, support = stats[:, 0].tolist(), stats[:, 4].tolist()
        self.test_per_class_recall = [
            t / n if n else None for t, n in zip(tp, support, strict=True)
        ]

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Each readable row's `index` and `probs` (with test-time augmentation: the mean of
        the views' probabilities) and `energy` (logsumexp of the clean view's logits: the OOD
        score of pseudo_label.ood_score=energy, higher = more in-distribution); `bad`: the
        count of rows that could not be read, and `bad_index` / `bad_why` which ones and why
        (data.on_bad_image=skip)."""
        views = batch.get("views", [batch["image"]])
        if len(batch["image"]):
            logits = [self(v).float() for v in views]  # views[0] is the clean image
            probs = sum(z.softmax(1) for z in logits) / len(views)
            energy = torch.logsumexp(logits[0], dim=1)
        else:  # every image of the batch was unreadable
            probs = torch.zeros((0, self.num_classes), device=self.device)
            energy = torch.zeros(0, device=self.device)
        return {
            "index": batch["index"],
            "probs": probs,
            "energy": energy,
            "bad": batch.get("num_bad", 0),
            "bad_index": batch.get("bad_index", batch["index"][:0]),
            "bad_why": batch.get("bad_why", []),
        }

    def _total_steps(self) -> int:
        """The optimizer steps of the whole fit, for the schedule. Lightning's
        estimated_stepping_batches builds and iterates the train loader to count them, before
        a checkpoint is restored: the resumed epoch would then start over instead of going on
        where the checkpoint left it. The data module counts its batches without a loader."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_batches_per_epoch"):
            return int(trainer.estimated_stepping_batches)
        per_epoch = -(-datamodule.train_batches_per_epoch() // trainer.accumulate_grad_batches)
        total = per_epoch * max(1, trainer.max_epochs or 1)
        return (
            min(total, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else total
        )

    @property
    def one_param_group(self) -> bool:
        """The optimizer holds body and head in one group (body, then head) unless fine-tuning
        scales the body's lr: a second group with the same settings updates the same weights, at
        the cost of a second pass of the optimizer's and the schedule's per-group work every
        step (about 0.15 ms a step for SmallCNN's AdamW on 2 cores)."""
        return self.backbone_lr_scale == 1.0 and self.layer_decay is None

    def configure_optimizers(self) -> Any:
        # One group (body, then head); fine-tuning: the body at lr_scale x the head's lr, or
        # per block with layer-wise decay (models/finetune.py).
        groups = param_groups(self.net, self.backbone_lr_scale, self.layer_decay)
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        total = max(1, self._total_steps())
        scheduler = self.scheduler_factory(optimizer, T_max=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
