"""Fine-tuning pretrained weights on the labelled target set (`stage=finetune`), and the whole
baseline (`stage=baseline`): pretrain -> fine-tune -> evaluate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.config.specs import ModelSpec, RunSpec
from pipeline.data.task import Task, prepare_task
from pipeline.engine.pretrained import pretrained_checkpoint
from pipeline.engine.summary import summary
from pipeline.engine.train import train_labelled
from pipeline.models.finetune import check_cache_features
from pipeline.runtime import io
from pipeline.runtime.rundir import DONE, RunDir, Step


def run_finetune(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Fine-tune `ckpt` on the labelled target split with finetune.mode; evaluate."""
    start = time.time()
    check_cache_features(cfg)
    task = prepare_task(cfg.data, cfg.seed, run)
    metrics = finetune(cfg, task, run.step(), Path(cfg.ckpt))
    return summary(cfg, run, "finetune", task, [metrics], start)


def finetune(cfg: RunSpec, task: Task, step: Step, ckpt: Path | None) -> dict[str, Any]:
    """Train on the labelled target starting from `ckpt` (None: torchvision's model.weights)."""
    if step.done:
        return step.result()
    _, metrics = train_labelled(cfg, task, step, cfg.seed * 1000, ckpt, phase="teacher")
    metrics.update({"round": 0, "num_pseudo": 0, "finetune_mode": str(cfg.finetune.mode)})
    return step.finish(metrics)


def model_weights_source(model: ModelSpec) -> str:
    """Where a model's own pretrained weights come from: "torchvision IMAGENET1K_V1",
    "timm resnet50 (pretrained)", "timm resnet50 /path/w.safetensors"."""
    zoo = model.zoo or "torchvision"
    if model.weights:
        return (
            f"{zoo} {model.weights}"
            if zoo == "torchvision"
            else f"{zoo} {model.name} {model.weights}"
        )
    return f"{zoo} {model.name} (pretrained)"


def run_baseline(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    """Pretrain (or take pretrained weights) -> fine-tune on the labelled target -> evaluate."""
    start = time.time()
    check_cache_features(cfg)  # (before the pretraining: a refusal is exit 2 at once)
    task = prepare_task(cfg.data, cfg.seed, run)
    ckpt = pretrained_checkpoint(cfg, run)
    metrics = finetune(cfg, task, run.step("finetune"), ckpt)
    extra: dict[str, Any] = {
        "finetune_mode": str(cfg.finetune.mode),
        "pretrain_source": str(ckpt) if ckpt else model_weights_source(cfg.model),
    }
    if run.exists(run / "pretrain" / DONE):
        pre = io.read_json(run / "pretrain" / DONE)
        extra.update(
            {"pretrain_source": pre.get("source"), "pretrain_test_accuracy": pre["test_accuracy"]}
        )
    return summary(cfg, run, "baseline", task, [metrics], start, **extra)
