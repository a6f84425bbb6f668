"""The pretrained weights a training starts from (`init=pretrained`, `stage=baseline`,
`stage=pretrain`): pretrain.ckpt, the model's own weights (torchvision, timm, a file), a
pretraining shared through pretrain.cache_dir, or one run inside the run dir. Both recipes
(self-training and the baseline) start from here."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from pipeline.config.keys import result_keys
from pipeline.config.specs import RunSpec
from pipeline.data.task import prepare_task
from pipeline.engine.train import train_model
from pipeline.engine.training_set import TrainingSet
from pipeline.runtime.rundir import DONE, RunDir, Step

log = logging.getLogger("pipeline")

# Settings a pretraining run does not read (the target's, and what comes after pretraining):
# two runs that differ only in these share one pretrained checkpoint through pretrain.cache_dir.
NOT_READ_BY_PRETRAINING = (
    "data",
    "stage",
    "init",
    "ckpt",
    "pseudo_in",
    "selftrain",
    "student_model",  # a student's pretraining has its architecture in `model`
    "finetune",
    "model.cache_features",  # (the pretraining trains its body: never on cached features)
    "train.epochs",
    "pseudo_label.threshold",
    "pseudo_label.max_per_class",
    "pseudo_label.balance",
    "pseudo_label.soft",
    "pseudo_label.temperature",
    "pseudo_label.weight",
    "pretrain.ckpt",
    "experiment",
)
PRETRAIN_FILES = ("model.ckpt", DONE)  # metrics.json last: its presence marks a complete copy
PRETRAIN_SEED_OFFSET = 7919  # the pretraining's seed differs from the target training's


def pretrain(cfg: RunSpec, step: Step) -> dict[str, Any]:
    """Train on the source set in `step` (resumable like any step); its metrics."""
    src = cfg.pretrain_data
    task = prepare_task(src, cfg.seed, None)
    if step.done:
        return step.result()
    train_set = TrainingSet.labelled_only(task.labelled.labels.numpy(), task.num_classes)
    record = {"pretrain_source": str(src.name)}
    _, metrics = train_model(
        cfg, task, step, cfg.seed + PRETRAIN_SEED_OFFSET, train_set, phase="pretraining",
        data=src, epochs=cfg.pretrain.epochs, record=record,
    )  # fmt: skip
    metrics.update({"round": 0, "source": str(src.name), "num_labelled": len(task.labelled)})
    return step.finish(metrics)


def pretrained_checkpoint(cfg: RunSpec, run: RunDir, step_name: str = "pretrain") -> Path | None:
    """The pretrained weights this run (its `model`) starts from: pretrain.ckpt, torchvision
    weights (None: the network loads them itself), or a pretraining run inside
    run_dir/<step_name>."""
    if cfg.pretrain.ckpt:
        return Path(cfg.pretrain.ckpt)
    if cfg.model.own_weights:
        return None
    step = run.step(step_name)
    if not step.done and not take_cached_pretraining(cfg, step):
        pretrain(cfg, step)
        share_pretraining(cfg, step)
    step.clean()  # a kill right after its metrics.json may have left resume state
    return step / "model.ckpt"


def pretrain_key(cfg: RunSpec) -> str:
    """A name for the pretraining this run does: the source, the seed, and a digest of every
    setting the pretraining reads (anything not known to be unread counts, so a new setting can
    only cause a cache miss, never a wrong hit)."""
    keys = {
        k: v
        for k, v in result_keys(cfg.config).items()
        if not any(k == n or k.startswith(n + ".") for n in NOT_READ_BY_PRETRAINING)
    }
    digest = hashlib.sha1(repr(sorted(keys.items())).encode()).hexdigest()[:12]
    return f"{cfg.pretrain_data.name}-seed{cfg.seed}-{digest}"


def take_cached_pretraining(cfg: RunSpec, step: Step) -> bool:
    """Copy a finished pretraining with the same settings from pretrain.cache_dir, if there is
    one (a sweep's jobs then pretrain once per seed instead of once per job)."""
    if not cfg.pretrain.cache_dir:
        return False
    cached = Path(cfg.pretrain.cache_dir) / pretrain_key(cfg)
    found = step.run.exists(cached / DONE)
    if found:
        step.run.copy_files(cached, step.path, PRETRAIN_FILES)
        log.info("pretrained weights %s taken from pretrain.cache_dir", cached.name)
    return found


def share_pretraining(cfg: RunSpec, step: Step) -> None:
    """Publish a finished pretraining into pretrain.cache_dir. Atomic renames, no locks: jobs
    that pretrain the same thing at the same time only duplicate work."""
    if cfg.pretrain.cache_dir:  # the same on every rank
        cached = Path(cfg.pretrain.cache_dir) / pretrain_key(cfg)
        step.run.copy_files(step.path, cached, PRETRAIN_FILES)
