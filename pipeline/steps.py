"""The building blocks the stages are made of: prepare the data, train a model, pseudo-label,
evaluate. Each one does one thing, reads and writes the artifacts of the design contract, and is
safe to call on every DDP rank (only rank 0 writes shared files; ranks meet at barriers)."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline import dist
from pipeline.artifacts import load_checkpoint, read_npz, save_checkpoint, write_npz
from pipeline.data import (
    DataBundle,
    ImageArrays,
    Splits,
    check_disjoint,
    load_data,
    make_splits,
    subset,
    unlabelled_pool,
)
from pipeline.errors import UserError
from pipeline.models import freeze_for_finetune, load_pretrained, reset_head
from pipeline.preemption import CheckpointOnSignal
from pipeline.selection import (
    PseudoLabels,
    TrainingSet,
    mixed_batches,
    one_hot,
    select_pseudo_labels,
)
from pipeline.training import (
    TEST_ACC,
    TEST_COUNT,
    BatchAugment,
    Batches,
    ImageDataModule,
    IndexedPredictionWriter,
    LitClassifier,
    build_trainer,
)

log = logging.getLogger("pipeline")


@dataclass
class Task:
    """One dataset, split for self-training: what every stage works on."""

    bundle: DataBundle
    splits: Splits
    labelled: ImageArrays
    unlabelled: ImageArrays  # its labels are the truth kept aside for reporting only
    test: ImageArrays

    @property
    def num_classes(self) -> int:
        return len(self.bundle.classes)


def prepare_task(data_cfg: DictConfig, seed: int, run_dir: Path | None) -> Task:
    """Load the data, split it by `labels_per_class` and `seed`, check the splits do not overlap,
    and record them in run_dir/splits.npz (rank 0)."""
    bundle = load_data(data_cfg)
    if len(bundle.classes) != data_cfg.num_classes:
        raise UserError(
            f"data.num_classes={data_cfg.num_classes} but the data has {len(bundle.classes)} "
            f"classes; set data.num_classes={len(bundle.classes)}"
        )
    assert bundle.train.labels is not None
    splits = make_splits(
        bundle.train.labels.numpy(),
        data_cfg.get("labels_per_class"),
        data_cfg.get("val_per_class", 0),
        seed,
        len(bundle.classes),
    )
    check_disjoint(labelled=splits.labelled, val=splits.val, unlabelled=splits.unlabelled)
    if run_dir is not None and dist.is_rank_zero() and not (run_dir / "splits.npz").exists():
        splits.save(run_dir / "splits.npz")
    return Task(
        bundle=bundle,
        splits=splits,
        labelled=subset(bundle.train, splits.labelled),
        unlabelled=unlabelled_pool(bundle, splits),
        test=bundle.test,
    )


def hparams_for(cfg: DictConfig, data_cfg: DictConfig, num_classes: int) -> dict[str, Any]:
    """What a checkpoint records about itself (plain containers only)."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": str(data_cfg.name),
        "num_classes": int(num_classes),
        "in_channels": int(data_cfg.channels),
        "image_size": int(data_cfg.image_size),
    }


def build_net(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    return instantiate(cfg.model.net, num_classes=num_classes)


def refuse_other_model(cfg: DictConfig, ckpt: dict[str, Any], what: str, hint: str = "") -> None:
    """A checkpoint of another architecture than cfg.model cannot load: say which to pass."""
    made_with = ((ckpt.get("hyper_parameters") or {}).get("model") or {}).get("name")
    if made_with and made_with != cfg.model.name:
        raise UserError(
            f"{what} is a model={made_with}, this run has model={cfg.model.name}; "
            f"pass model={made_with}{hint}"
        )


def load_net(cfg: DictConfig, ckpt_path: str | Path, num_classes: int) -> torch.nn.Module:
    """The configured network with a checkpoint's weights; refuses a checkpoint made for another
    architecture or class count with a line that says which."""
    ckpt = load_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters", {}) or {}
    refuse_other_model(cfg, ckpt, f"checkpoint {ckpt_path}")
    if hp.get("num_classes") not in (None, num_classes):
        raise UserError(
            f"checkpoint {ckpt_path} predicts {hp['num_classes']} classes, the data has "
            f"{num_classes}; use a checkpoint trained on this dataset (or stage=finetune)"
        )
    net = build_net(cfg, num_classes)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise UserError(
            f"checkpoint {ckpt_path} does not fit model={cfg.model.name} ({first[:150]})"
        ) from None
    return net


def save_model(path: Path, net: torch.nn.Module, hparams: dict[str, Any], extra: dict) -> None:
    """The round's final weights, Lightning-compatible keys, loadable with weights_only=True."""
    if dist.is_rank_zero():
        state = {f"net.{k}": v.detach().cpu() for k, v in net.state_dict().items()}
        save_checkpoint(
            path,
            {
                "state_dict": state,
                "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__,
                "pipeline": extra,
            },
        )
    dist.barrier()


def make_datamodule(
    cfg: DictConfig, data_cfg: DictConfig, seed: int, predict_views: int = 0, **sets: Any
) -> ImageDataModule:
    aug = data_cfg.get("augment")
    augment = BatchAugment(**OmegaConf.to_container(aug, resolve=True)) if aug else None
    return ImageDataModule(
        mean=list(data_cfg.mean),
        std=list(data_cfg.std),
        augment=augment,
        seed=seed,
        num_workers=data_cfg.get("num_workers", 0),
        channels_last=cfg.trainer.get("channels_last", False),
        eval_batch_size=cfg.train.eval_batch_size,
        predict_views=predict_views,
        **sets,
    )


def training_batches(train_set: TrainingSet, cfg: DictConfig, epochs: int) -> Any:
    """The epoch's batches: at least train.min_steps steps over the whole training (per rank),
    so a teacher on 40 labels still gets enough updates."""
    n_lab = train_set.num_labelled
    n_ps = len(train_set) - n_lab
    bs = cfg.train.batch_size
    frac = cfg.pseudo_label.labelled_fraction
    min_batches = math.ceil(cfg.train.min_steps / max(1, epochs)) * dist.world_size()

    def make(rng: np.random.Generator) -> list[np.ndarray]:
        return mixed_batches(n_lab, n_ps, bs, frac, rng, min_batches)

    return make


def fit(
    cfg: DictConfig,
    data_cfg: DictConfig,
    net: torch.nn.Module,
    images: torch.Tensor,
    train_set: TrainingSet,
    work_dir: Path,
    seed: int,
    epochs: int,
    hparams: dict[str, Any],
    lr_scale: float = 1.0,
    frozen: list[torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """Train `net` on a TrainingSet (images given in TrainingSet row order). Resumes from
    work_dir/checkpoints/last.ckpt when a killed run left one."""
    L.seed_everything(seed, workers=True, verbose=False)
    if epochs == 0:
        return net
    make = training_batches(train_set, cfg, epochs)
    data = Batches(
        images,
        torch.from_numpy(train_set.targets),
        torch.from_numpy(train_set.weight),
    )
    dm = make_datamodule(cfg, data_cfg, seed, train=data, train_batches=make)
    module = LitClassifier(
        net,
        num_classes=train_set.targets.shape[1],
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
    trainer = build_trainer(
        cfg.trainer,
        max_epochs=epochs,
        ckpt_dir=ckpt_dir,
        progress=cfg.progress,
        callbacks=[CheckpointOnSignal(last)],  # a cluster's "time is up": save, stop, requeue
        root_dir=work_dir,
    )
    if last.exists():
        log.info("resuming training from %s", last)
    trainer.fit(
        module, datamodule=dm, ckpt_path=str(last) if last.exists() else None, weights_only=True
    )
    return net


def evaluate(
    cfg: DictConfig, data_cfg: DictConfig, net: torch.nn.Module, test: ImageArrays
) -> dict[str, float]:
    """Test accuracy, each test sample counted exactly once (also under DDP)."""
    assert test.labels is not None
    num_classes = int(data_cfg.num_classes)
    targets = torch.from_numpy(one_hot(test.labels.numpy(), num_classes))
    data = Batches(test.images, targets, torch.ones(len(test)))
    dm = make_datamodule(cfg, data_cfg, 0, test=data)
    module = LitClassifier(net, num_classes=num_classes, optimizer=instantiate(cfg.optimizer))
    trainer = build_trainer(cfg.trainer, progress=cfg.progress)
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    count = int(round(out[TEST_COUNT]))
    if count != len(test):
        raise RuntimeError(f"evaluation counted {count} test samples, expected {len(test)}")
    return {"test_accuracy": float(out[TEST_ACC]), "num_test": count}


def predict(
    cfg: DictConfig, data_cfg: DictConfig, net: torch.nn.Module, dataset: Any, work_dir: Path
) -> tuple[np.ndarray, np.ndarray] | None:
    """The network's probabilities for every row of `dataset`, keyed by index. Each rank labels
    its shard and writes it; rank 0 merges by index and checks every index appears exactly once.
    Returns (index, probs) on rank 0, None on the other ranks."""
    shard_dir = work_dir / "predict_shards"
    if dist.is_rank_zero() and shard_dir.exists():
        shutil.rmtree(shard_dir)  # left by a killed pass (maybe with other ranks): redo them all
    dist.barrier()
    writer = IndexedPredictionWriter(shard_dir)
    views = int(cfg.pseudo_label.get("tta_views", 0))
    dm = make_datamodule(cfg, data_cfg, 0, predict_views=views, predict=dataset)
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


def pseudo_label(
    cfg: DictConfig, data_cfg: DictConfig, net: torch.nn.Module, unlabelled: ImageArrays, out: Path
) -> tuple[PseudoLabels, np.ndarray | None]:
    """Label the unlabelled set, select, and write `out` (pseudo_labels.npz) atomically.
    Returns the kept pseudo-labels (on every rank) and, on rank 0, all probabilities."""
    data = Batches(unlabelled.images)
    pred = predict(cfg, data_cfg, net, data, out.parent)
    probs = None
    if dist.is_rank_zero():
        index, probs = pred
        pl = cfg.pseudo_label
        kept = select_pseudo_labels(
            torch.from_numpy(index),
            torch.from_numpy(probs),
            threshold=pl.threshold,
            max_per_class=pl.max_per_class,
            soft=pl.soft,
            temperature=pl.temperature,
        )
        write_npz(out, kept.arrays())
        probs = probs[np.argsort(index)]
    dist.barrier()
    return read_pseudo_labels(out, len(unlabelled), int(data_cfg.num_classes)), probs


def read_pseudo_labels(path: Path, num_unlabelled: int, num_classes: int) -> PseudoLabels:
    """pseudo_labels.npz, checked: indices in range and unique, labels in range."""
    z = read_npz(path)
    missing = {"index", "label", "confidence"} - set(z)
    if missing:
        raise UserError(f"{path} lacks arrays {sorted(missing)}; expected a pseudo_labels.npz")
    index, label = z["index"].astype(np.int64), z["label"].astype(np.int64)
    if len(index) and (index.min() < 0 or index.max() >= num_unlabelled):
        raise UserError(
            f"{path} has indices outside the unlabelled set (size {num_unlabelled}); "
            "was it made for another dataset, labels_per_class or seed?"
        )
    if len(np.unique(index)) != len(index):
        raise UserError(f"{path} lists an unlabelled index more than once")
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        raise UserError(f"{path} has labels outside 0..{num_classes - 1}")
    return PseudoLabels(index, label, z["confidence"].astype(np.float32), z.get("probs"))


def training_images(task: Task, train_set: TrainingSet) -> torch.Tensor:
    """The images of a TrainingSet, in its row order (labelled rows, then pseudo-labelled)."""
    lab = train_set.source == 0
    return torch.cat(
        [
            task.labelled.images[torch.from_numpy(train_set.position[lab])],
            task.unlabelled.images[torch.from_numpy(train_set.position[~lab])],
        ]
    )


def init_from_pretrained(cfg: DictConfig, net: torch.nn.Module, ckpt_path: Path) -> list[str]:
    """Start `net` from pretrained weights for fine-tuning: every backbone layer loads (a clear
    error names those that cannot), the head is new. A new head also when the class count
    matches: the source's classes are not the target's (Zoph et al. fine-tune a new head)."""
    ckpt = load_checkpoint(ckpt_path)
    refuse_other_model(
        cfg, ckpt, f"pretrained checkpoint {ckpt_path}", f" or pretrain with model={cfg.model.name}"
    )
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
    try:
        recreated = load_pretrained(net, state, name=str(cfg.model.name))
    except UserError as e:
        raise UserError(f"pretrained {e} ({ckpt_path})") from None
    reset_head(net)
    source = (ckpt.get("pipeline") or {}).get("pretrain_source") or ckpt_path
    log.info(
        "starting from %s: backbone loaded, new head (%d classes)%s",
        source,
        net.head.out_features,
        " re-created for another class count" if recreated else "",
    )
    return sorted(set(recreated) | {k for k in net.state_dict() if k.startswith("head.")})


def finetune_setup(cfg: DictConfig, net: torch.nn.Module) -> tuple[float, list[torch.nn.Module]]:
    """The transfer mode of the fine-tuning: backbone lr factor and the modules kept frozen."""
    frozen = freeze_for_finetune(net, cfg.finetune.mode, cfg.finetune.trainable_blocks)
    return cfg.finetune.lr_scale, frozen
