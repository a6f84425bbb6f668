"""Weight EMA (`train.ema_decay`): the network a training ends with is the exponential moving
average of its weights, as in Noisy Student (TensorFlow's ExponentialMovingAverage) and the SSL
codebases (USB's `ema_m`, FixMatch's EMA model).

Lightning's WeightAveraging callback keeps the average (an AveragedModel of the parameters; its
state travels in last.ckpt, so a killed run resumes it). Two things make it right for short
trainings:

- the decay warms up as TensorFlow's does with `num_updates`: min(decay, (1 + n) / (10 + n))
  after n updates, so the random initialisation does not linger in the average of a training
  of a few hundred steps (0.999 ** 300 = 0.74 of it would);
- BatchNorm statistics follow the averaged weights: running means and variances belong to the
  weights that produced them, and an average of weights is a network no batch ever ran through.
  When training ends, the averaged weights are copied into the network and its BatchNorm
  statistics are recomputed over training batches (the cumulative average of torch's
  swa_utils.update_bn), so evaluation and pseudo-labelling use averaged weights with statistics
  of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Batches of training data the BatchNorm statistics of the averaged weights are computed over
# (one epoch of them, at most this many).
BN_BATCHES = 100


def warmup_decay(decay: float, num_updates: int) -> float:
    """The decay after `num_updates` updates: min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def ema_multi_avg_fn(decay: float) -> Callable[[list[torch.Tensor], list[torch.Tensor], Any], None]:
    """AveragedModel's multi_avg_fn: ema <- d * ema + (1 - d) * current for every parameter at
    once, with the warmed-up decay d."""

    @torch.no_grad()
    def average(ema: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        d = warmup_decay(decay, int(num_averaged))
        torch._foreach_lerp_(ema, current, 1.0 - d)

    return average


def batchnorms(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers whose statistics training updates (frozen ones are in eval mode)."""
    return [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.training
    ]


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of `module`'s BatchNorm layers (those in training mode)
    as the plain average over `inputs` (torch.optim.swa_utils.update_bn); the module is run in
    its current mode, nothing else changes. Returns the number of batches seen."""
    layers = batchnorms(module)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    seen = 0
    try:
        for x in inputs:
            module(x)
            seen += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
    _average_over_ranks(layers)
    return seen


def _average_over_ranks(layers: list[_BatchNorm]) -> None:
    """With DDP every rank saw its share of the batches: take the mean of their statistics."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in layers:
        for stat in (m.running_mean, m.running_var):
            if stat is not None:
                dist.all_reduce(stat, op=dist.ReduceOp.SUM)
                stat.div_(dist.get_world_size())


class EMA(WeightAveraging):
    """The EMA of the weights, updated after every optimizer step; at the end of training the
    network holds the averaged weights with BatchNorm statistics recomputed for them."""

    def __init__(self, decay: float, bn_batches: int = BN_BATCHES) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} is outside [0, 1)")
        # use_buffers=False: the parameters are averaged; the BatchNorm statistics are
        # recomputed for the averaged weights when training ends (the buffers are kept in step
        # with the network's meanwhile).
        super().__init__(use_buffers=False, multi_avg_fn=ema_multi_avg_fn(decay))
        self.decay, self.bn_batches = decay, bn_batches

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # the averaged weights into the network
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "training_inputs"):
            return
        mode = pl_module.training
        pl_module.train()  # (frozen BatchNorms stay in eval mode: their statistics are kept)
        try:
            recompute_batchnorm(
                pl_module, datamodule.training_inputs(pl_module.device, self.bn_batches)
            )
        finally:
            pl_module.train(mode)
