"""The `trainer` node: every key a Lightning Trainer argument or one of the pipeline's own."""

from __future__ import annotations

from typing import Any

from pipeline.errors import UserError

# The arguments of lightning.Trainer (2.6), listed here so that checking a config needs no
# Lightning import (tests/test_config.py checks the list against the installed Lightning).
TRAINER_ARGUMENTS = (
    "accelerator", "accumulate_grad_batches", "barebones", "benchmark", "callbacks",
    "check_val_every_n_epoch", "default_root_dir", "detect_anomaly", "deterministic", "devices",
    "enable_autolog_hparams", "enable_checkpointing", "enable_model_summary",
    "enable_progress_bar", "fast_dev_run", "gradient_clip_algorithm", "gradient_clip_val",
    "inference_mode", "limit_predict_batches", "limit_test_batches", "limit_train_batches",
    "limit_val_batches", "log_every_n_steps", "logger", "max_epochs", "max_steps", "max_time",
    "min_epochs", "min_steps", "model_registry", "num_nodes", "num_sanity_val_steps",
    "overfit_batches", "plugins", "precision", "profiler", "reload_dataloaders_every_n_epochs",
    "strategy", "sync_batchnorm", "use_distributed_sampler", "val_check_interval",
)  # fmt: skip
# trainer.* keys the pipeline reads itself; every other key is a Lightning Trainer argument.
PIPELINE_TRAINER_KEYS = ("num_threads", "compile", "channels_last")
# Trainer arguments the pipeline sets itself, and the setting to use instead.
SET_BY_PIPELINE = {
    "max_epochs": "train.epochs",
    "min_epochs": "train.epochs",
    "max_steps": "train.epochs and train.min_steps",
    "min_steps": "train.min_steps",
    "callbacks": "the pipeline's own callbacks",
    "plugins": "trainer.precision and the cluster settings",
    "logger": "the logger group (logger=csv|tensorboard|mlflow|wandb, or logger=[csv,tensorboard])",
    "limit_val_batches": "data.val_per_class or data.val_dir (the whole val split is evaluated)",
    "enable_checkpointing": "the pipeline's resume checkpoints",
    "enable_progress_bar": "progress=",
    "use_distributed_sampler": "the pipeline's rank-aware samplers",
    "default_root_dir": "run_dir=",
}


def check_trainer_keys(trainer_cfg: Any) -> None:
    """Every trainer.* key is a Lightning Trainer argument or one of the pipeline's own; an
    unknown one, or one the pipeline sets itself, is refused and never ignored."""
    for key in trainer_cfg:
        if key in PIPELINE_TRAINER_KEYS:
            continue
        if key in SET_BY_PIPELINE:
            raise UserError(
                f"trainer.{key} is set by the pipeline; use {SET_BY_PIPELINE[key]} instead"
            )
        if key not in TRAINER_ARGUMENTS:
            raise UserError(
                f"trainer.{key} is not a Lightning Trainer argument; check the spelling "
                "(see the arguments of lightning.Trainer)"
            )
