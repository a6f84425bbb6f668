"""The Lightning Trainer as the pipeline builds it, from the `trainer` config node, with the
pipeline's atomic checkpoint writer."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from pipeline.config.checks import PIPELINE_TRAINER_KEYS, check_trainer_keys
from pipeline.runtime import preemption
from pipeline.runtime.io import atomic_path
from pipeline.runtime.launch import lightning_settings


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


class _NoSignalHandlers(_SignalConnector):
    """Lightning's signal handling, switched off: the pipeline's (runtime/preemption.py) saves
    and stops on USR1, USR2 and TERM. Lightning's own would end training on TERM at the next
    step without saving, with exit code 0 (a preempted job would look finished), broadcasting
    from inside the signal handler."""

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
        with preemption.lightning_running():
            return super().fit(*args, **kwargs)

    def test(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().test(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().predict(*args, **kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        with preemption.lightning_running():
            return super().validate(*args, **kwargs)


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
) -> L.Trainer:
    """The Lightning Trainer from the `trainer` config node: every Trainer argument in it is
    passed through (`+trainer.gradient_clip_val=1.0` reaches the Trainer); samplers, checkpoints
    and callbacks are the pipeline's own (rank-aware), so Lightning's are off; so is its signal
    handling."""
    # A signal stops evaluation and labelling at the next batch (training: CheckpointOnSignal).
    callbacks = [*(callbacks or []), preemption.StopOnSignal()]
    if ckpt_dir is not None:
        # Only last.ckpt, what a killed run resumes from: every `ckpt_every_s` seconds of
        # training, or every epoch (None). Saving costs a small model's tiny epochs a few
        # percent of their time. (save_top_k=0 with save_last=True writes nothing since
        # Lightning 2.5: keep the latest instead.)
        every = {"every_n_epochs": 1}
        if ckpt_every_s:
            every = {"train_time_interval": datetime.timedelta(seconds=ckpt_every_s)}
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="last",
                save_top_k=1,
                enable_version_counter=False,
                **every,
            )
        )
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
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=progress,
        use_distributed_sampler=False,
        default_root_dir=str(root_dir) if root_dir else os.getcwd(),
    )
    return Trainer(**args)
