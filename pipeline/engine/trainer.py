"""The Lightning Trainer as the pipeline builds it, from the `trainer` config node, with the
pipeline's atomic checkpoint writer and its handling of signals (runtime/preemption.py):
recorded while Lightning runs, acted upon at the next batch (training saves last.ckpt first)."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, RichProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from pipeline.config.checks import PIPELINE_TRAINER_KEYS, check_trainer_keys
from pipeline.errors import UserError
from pipeline.runtime import dist, preemption
from pipeline.runtime.io import DamagedCheckpoint, load_checkpoint, save_checkpoint, set_aside
from pipeline.runtime.launch import lightning_settings

log = logging.getLogger("pipeline")

# Lightning's warnings on resuming that do not apply here, silenced while fit runs:
RESUME_WARNINGS = (
    # Resuming from a checkpoint saved mid-epoch is exact here: the train sampler
    # (engine/datamodule.py EpochBatches) goes on with the rest of that epoch's batches, from
    # the optimizer step the checkpoint holds. Lightning cannot see that and warns that it may
    # not be.
    "You're resuming from a checkpoint that ended before",
    # A last.ckpt written before LastCheckpoint (by Lightning's ModelCheckpoint) holds that
    # callback's state, which nothing needs on resume; Lightning asks for the callback.
    "Be aware that when using `ckpt_path`",
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through the pipeline's one atomic writer
    (runtime/io.py: a temporary file and a rename, so a kill while saving last.ckpt leaves the
    previous last.ckpt intact; a full disk is one line, exit 2) with the checksum of the
    checkpoint's tensors. Loads with weights_only=True and checks the checksum."""

    def __init__(self) -> None:
        super().__init__()
        self._checked: dict[str, dict] = {}  # a checkpoint Trainer.fit checked before resuming

    def save_checkpoint(
        self, checkpoint: dict, path: str | Path, storage_options: Any = None
    ) -> None:
        save_checkpoint(Path(path), checkpoint)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        checked = self._checked.pop(os.path.realpath(path), None)
        if checked is not None:  # read once: Trainer.fit checked it just before
            return checked
        return load_checkpoint(path, map_location=map_location or "cpu")

    def checked(self, path: str | Path) -> dict:
        """Load and check `path` now, keeping it for Lightning's load that follows."""
        ckpt = load_checkpoint(path)
        self._checked[os.path.realpath(path)] = ckpt
        return ckpt


# --- signals (runtime/preemption.py) and last.ckpt ------------------------------------------


def _agreed_flags(trainer: L.Trainer, *flags: int | torch.Tensor) -> list[int]:
    """Each flag's maximum over the ranks: ranks may get a signal, see a clock run out or a loss
    that is not finite a step apart, so they agree every step in one small all-reduce. A flag
    may be a 0-dim tensor on the device (read without a host round trip of its own)."""
    if trainer.world_size <= 1:
        return [int(f) for f in flags]
    device = trainer.strategy.root_device
    t = torch.stack([torch.as_tensor(f, device=device).reshape(()).long() for f in flags])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


class LastCheckpoint(Checkpoint):
    """Writes `path` (checkpoints/last.ckpt), what a killed run resumes from: every `every_s`
    seconds of training (or, with None, at every epoch's end), and at the next step after a
    signal, which then stops training (the stage exits or requeues: runtime/requeue.py).
    It also stops a training that diverged (a loss that is not finite, checked every step;
    weights that are not, at every epoch's end) with one line (exit 2), never saving its
    weights: last.ckpt keeps the last good state.

    One callback and one agreement per step for all three: Lightning's ModelCheckpoint with
    `train_time_interval` broadcasts rank 0's clock as a pickled object every step, and every
    callback costs the training loop a dispatch per hook per step. A Checkpoint, so Lightning
    runs its epoch-end hook after the module's (whose epoch record the checkpoint keeps)."""

    def __init__(self, path: Path, every_s: float | None = None) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self._due = math.inf
        self._unread: tuple[int, torch.Tensor] | None = None  # one GPU: last step's loss check

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_s is not None:
            self._due = time.monotonic() + self.every_s

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        step, bad = self._loss_check(trainer, outputs)
        signum, due, diverged = _agreed_flags(
            trainer, preemption.pending(), time.monotonic() >= self._due, bad
        )
        if diverged:  # before any save: the weights after a non-finite loss are not kept
            raise UserError(diverged_line(trainer, pl_module, self.path, "the loss", step))
        if signum:
            self._read_unread(trainer, pl_module)
            self._save(trainer, signal=True)
            raise preemption.Preempted(signum)
        if due:
            self._read_unread(trainer, pl_module)
            self._save(trainer)
            self._due = time.monotonic() + (self.every_s or 0.0)

    def _loss_check(self, trainer: L.Trainer, outputs: Any) -> tuple[int, int | torch.Tensor]:
        """(step, flag): whether the step's loss is not finite, as a 0-dim tensor. On one GPU
        the flag read is last step's (reading this step's would wait for the device every
        step); on the CPU and under DDP (whose flags are read anyway) this step's."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return trainer.global_step, 0
        bad = ~torch.isfinite(loss.detach()).all()
        if trainer.world_size > 1 or bad.device.type == "cpu":
            return trainer.global_step, bad
        previous, self._unread = self._unread, (trainer.global_step, bad)
        return previous if previous is not None else (trainer.global_step, 0)

    def _read_unread(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One GPU: read the check not read yet (the last step's) before anything is saved."""
        if self._unread is not None:
            (step, bad), self._unread = self._unread, None
            if bool(bad):
                raise UserError(diverged_line(trainer, pl_module, self.path, "the loss", step))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_unread(trainer, pl_module)  # the epoch's last loss check
        # The weights are the same on every rank (DDP averages the gradients), so every rank
        # reaches the same verdict without a reduction.
        if not weights_finite(pl_module):
            step = trainer.global_step
            raise UserError(diverged_line(trainer, pl_module, self.path, "the weights", step))
        if self.every_s is None:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (signum,) = _agreed_flags(trainer, preemption.pending())
        if signum:  # one that came during the last step: the Trainer raises once fit returns
            self._read_unread(trainer, pl_module)
            self._save(trainer, signal=True)

    def _save(self, trainer: L.Trainer, signal: bool = False) -> None:
        trainer.save_checkpoint(self.path)  # collective: rank 0 writes, all meet at a barrier
        if signal and trainer.is_global_zero:
            log.warning("saved %s at step %d", self.path, trainer.global_step)


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every floating parameter and buffer is finite (one host read for all)."""
    tensors = [t for t in module.state_dict().values() if torch.is_floating_point(t)]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def diverged_line(
    trainer: L.Trainer, module: L.LightningModule, ckpt: Path, what: str, step: int
) -> str:
    """The one line of a diverged training: which training (its metrics' prefix, round_1/, and
    the folder it trains in), when, and the likely cause."""
    work_dir = ckpt.parent.parent
    prefix = str(getattr(module, "log_prefix", "") or "").strip("/")
    where = f"{prefix} in {work_dir}" if prefix else f"in {work_dir}"
    lr = None
    if trainer.optimizers:
        group = trainer.optimizers[0].param_groups[-1]  # the head's: fine-tuning scales the body
        lr = group.get("initial_lr", group.get("lr"))
    cause = f"optimizer.lr={lr:g}" if isinstance(lr, int | float) else "optimizer.lr"
    return (
        f"training {where} diverged: {what} became NaN or infinite at step {step} "
        f"(epoch {trainer.current_epoch}); the learning rate {cause} is the likely cause: pass a "
        "smaller one (with another run_dir= or overwrite=true); nothing after it was saved"
    )


class StopOnSignal(L.Callback):
    """Evaluation and labelling passes stop at the next batch after a signal (the shards
    labelled so far are kept: each was written when it was done)."""

    def _check(self, *args: Any) -> None:
        signum = preemption.pending()
        if signum and preemption.stage_running():
            raise preemption.Preempted(signum)

    on_test_batch_end = on_predict_batch_end = on_validation_batch_end = _check


class _NoSignalHandlers(_SignalConnector):
    """Lightning's signal handling, switched off: the pipeline's (runtime/preemption.py) saves
    and stops on USR1, USR2 and TERM. Lightning's own would end training on TERM at the next
    step without saving, with exit code 0 (a preempted job would look finished), broadcasting
    from inside the signal handler.

    The one private Lightning class the pipeline touches, kept for correctness, not speed: the
    Trainer has no public switch for its handlers. Lightning's SIGTERMException is a SystemExit
    without a code, so the process exits 0 (Lightning-AI/pytorch-lightning#19916, open), and its
    connector replaces the handlers a job installed before it (#1455). tests/test_signals.py
    fails if this class stops doing its job under a new Lightning release."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False

    def teardown(self) -> None:
        pass


class Trainer(L.Trainer):
    """The Lightning Trainer, with the pipeline's signal handling: while fit, test or predict
    runs a signal is recorded and acted upon at the next batch (runtime/preemption.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signal_connector = _NoSignalHandlers(self)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("ckpt_path"):
            kwargs["ckpt_path"] = self._resume_point(Path(kwargs["ckpt_path"]))
        with preemption.lightning_running(), warnings.catch_warnings():
            for message in RESUME_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return super().fit(*args, **kwargs)

    def _resume_point(self, path: Path) -> str | None:
        """`path` if it is an intact checkpoint (rank 0 checks it, once); a damaged one (cut
        short by a kill -9, emptied, garbled) is set aside and the training starts over (None)
        rather than failing on every re-run. Every rank gets the verdict."""
        damaged = None
        if dist.is_rank_zero():
            io = self.strategy.checkpoint_io
            try:
                io.checked(path) if isinstance(io, AtomicCheckpointIO) else load_checkpoint(path)
            except DamagedCheckpoint as e:
                damaged = str(e).split("; ")[0]
                aside = set_aside(path)
                log.warning("%s; set aside as %s: this training starts over", damaged, aside.name)
        return None if dist.broadcast_object(damaged) else str(path)

    def test(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().test(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().predict(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().validate(*args, **kwargs)


def channels_last(trainer_cfg: Mapping[str, Any]) -> bool:
    """`trainer.channels_last`: networks and batches in the NHWC memory format."""
    return bool(trainer_cfg["channels_last"])


def trainer_arguments(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `trainer` node as Lightning Trainer arguments (checked in config/checks.py)."""
    check_trainer_keys(trainer_cfg)
    return {k: v for k, v in trainer_cfg.items() if k not in PIPELINE_TRAINER_KEYS}


def build_trainer(
    trainer_cfg: Mapping[str, Any],
    max_epochs: int = 1,
    ckpt_dir: Path | None = None,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
    root_dir: Path | None = None,
    ckpt_every_s: float | None = None,
    loggers: list[Logger] | None = None,
    validate: bool = False,
    stop_on_signal: bool = True,
) -> L.Trainer:
    """The Lightning Trainer from the `trainer` config node: every Trainer argument in it is
    passed through (`+trainer.gradient_clip_val=1.0` reaches the Trainer); samplers, checkpoints
    and callbacks are the pipeline's own (rank-aware), so Lightning's are off; so is its signal
    handling. `loggers`: the run's Lightning loggers (engine/loggers.py); `validate`: run the
    validation loop every epoch (the data module serves a val set); `stop_on_signal`: a signal
    stops evaluation and labelling at the next batch (StopOnSignal). Training leaves it out: its
    LastCheckpoint (`ckpt_dir`) saves and stops at the next training batch, after a running
    validation pass (a stop inside it would lose the steps since the last save), and every
    callback costs Lightning a dispatch per hook per step."""
    callbacks = [*(callbacks or []), *([StopOnSignal()] if stop_on_signal else [])]
    if ckpt_dir is not None:
        # Only last.ckpt, what a killed run resumes from: every `ckpt_every_s` seconds of
        # training (0: every step), or every epoch (None); and on a signal. Saving costs a small
        # model's tiny epochs a few percent of their time.
        callbacks.append(LastCheckpoint(Path(ckpt_dir) / "last.ckpt", ckpt_every_s))
    if progress:
        callbacks.append(RichProgressBar(leave=False))
    # The strategy as named (a spawning ddp variant becomes ddp: the ranks exist already), and
    # SLURMEnvironment(auto_requeue=False) under SLURM tasks (runtime.preemption requeues).
    settings = lightning_settings(trainer_cfg)
    args = {"enable_model_summary": False, "num_sanity_val_steps": 0}
    args.update(trainer_arguments(trainer_cfg))
    args.update(
        strategy=settings["strategy"],
        max_epochs=max_epochs,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *settings["plugins"]],
        logger=list(loggers) if loggers else False,
        limit_val_batches=1.0 if validate else 0,
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=progress,
        use_distributed_sampler=False,
        default_root_dir=str(root_dir) if root_dir else os.getcwd(),
    )
    return Trainer(**args)
