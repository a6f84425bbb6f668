"""Frozen bodies at linear-probe speed (`model.cache_features=true`, docs/models.md).

With a frozen body (`finetune.mode=linear`) the body's output for an image never changes, so it
is computed once per split (labelled, val, test, unlabelled pool) and kept on disk:

    run_dir/features/<split>-<key>/part-00000.npy ...   float32 (rows, D), opened memory-mapped
    run_dir/features/<split>-<key>/meta.json            written last: the folder is complete

`<key>` is a digest of everything that determines the features: the body's tensors (weights and
BatchNorm statistics), the model name, the input shape and normalisation, the precision and the
split's images; a changed body or split gets another folder, never a stale one. Each part is
written atomically by the rank that computed it, so a killed pass computes only the missing
parts. The heads of every round (teacher, students) and the pseudo-labelling then read these
rows through the same engine (Trainer, checkpoints, metrics, resume) as images: `FeatureSet` is
an ImageSet whose rows are features, served by `FeatureDataModule` without decoding,
normalisation or augmentation, to `HeadOnly`, the network's own head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.data.arrays import ImageArrays, ImageSet
from pipeline.data.streamed import ConcatImages, manifests
from pipeline.data.task import Task
from pipeline.engine.datamodule import ImageDataModule
from pipeline.engine.trainer import build_trainer
from pipeline.errors import UserError
from pipeline.models.checkpoint import recorded_model
from pipeline.runtime import dist, io
from pipeline.runtime.rundir import RunDir

log = logging.getLogger("pipeline")

FEATURES_DIR = "features"  # under run_dir
PART_ROWS = 4096  # rows per part file (a multiple of the usual eval batch sizes)
META = "meta.json"


class FeatureSet(ImageSet):
    """Cached body outputs addressable by row, like images: `load(rows)` gathers float32
    (B, D) rows from memory-mapped part files (memory stays flat, whatever the set's size);
    `keys` and `labels` are those of the images they were computed from. A row whose image
    could not be read (data.on_bad_image=skip) holds NaN and is reported unreadable again."""

    in_memory = True  # indexing a memory map: no DataLoader workers

    def __init__(
        self,
        parts: list[np.ndarray],
        where: np.ndarray,
        sources: list[ImageSet],
        origin: np.ndarray,
        labels: torch.Tensor | None,
    ) -> None:
        # where[i] = (part, row in it) of row i; origin[i] = (source set, row in it).
        self.parts, self.where, self.sources, self.origin = parts, where, sources, origin
        self.labels = labels

    @classmethod
    def of_parts(cls, parts: list[np.ndarray], source: ImageSet) -> FeatureSet:
        """All rows of `parts` (one after the other), computed from `source`'s images."""
        where = np.concatenate(
            [np.zeros((0, 2), np.int64)]
            + [np.stack([np.full(len(p), i), np.arange(len(p))], 1) for i, p in enumerate(parts)]
        ).astype(np.int64)
        origin = np.stack([np.zeros(len(where), np.int64), np.arange(len(where))], 1)
        return cls(parts, where, [source], origin, source.labels)

    @property
    def dim(self) -> int:
        return int(self.parts[0].shape[1]) if self.parts else 0

    def __len__(self) -> int:
        return len(self.where)

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        at = self.where[np.asarray(rows, np.int64)]
        out = np.empty((len(at), self.dim), np.float32)
        for p in np.unique(at[:, 0]):
            sel = at[:, 0] == p
            out[sel] = self.parts[p][at[sel, 1]]
        bad = np.flatnonzero(np.isnan(out[:, 0])) if len(out) and self.dim else []
        keys = self.keys(np.asarray(rows, np.int64)[bad]) if len(bad) else []
        why = [
            (int(i), f"{k}: unreadable when its features were computed")
            for i, k in zip(bad, keys, strict=True)
        ]
        if len(bad):
            out[bad] = 0.0
        return torch.from_numpy(out), why

    def keys(self, rows: np.ndarray) -> np.ndarray:
        origin = self.origin[np.asarray(rows, np.int64)]
        out = np.empty(len(origin), dtype=object)
        for s in np.unique(origin[:, 0]):
            sel = origin[:, 0] == s
            out[sel] = self.sources[s].keys(origin[sel, 1])
        return out.astype(str)

    def subset(self, rows: np.ndarray) -> FeatureSet:
        rows = np.asarray(rows, np.int64)
        labels = self.labels[torch.from_numpy(rows)] if self.labels is not None else None
        return FeatureSet(self.parts, self.where[rows], self.sources, self.origin[rows], labels)


def is_features(images: ImageSet | None) -> bool:
    """Whether a set serves cached features (a FeatureSet, or sets of them one after the
    other) rather than images."""
    if isinstance(images, ConcatImages):
        return all(is_features(p) for p in images.parts)
    return isinstance(images, FeatureSet)


class FeatureDataModule(ImageDataModule):
    """Serves cached features as they are: no decoding, normalisation or augmentation (they
    were made from the clean, normalised image), no test-time views. Unreadable rows are
    dropped or stop the run as for images (data.on_bad_image)."""

    def _prepare(
        self, batch: dict, training: bool, predicting: bool, step: int | None = None
    ) -> dict:
        if "bad" in batch:
            batch = self._drop_bad(batch)
        return {**batch, "image": batch["image"].float()}


class HeadOnly(nn.Module):
    """A network's head alone, on features: what trains in cache mode. `head` is the network's
    own module (not a copy), so training it trains the network, body untouched."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = net.head
        self.num_classes, self.in_channels = net.num_classes, net.in_channels

    @property
    def num_features(self) -> int:
        return self.head.in_features

    def blocks(self) -> list[nn.Module]:
        return []  # (the body is frozen: no block has a trainable parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class BodyOutputs(L.LightningModule):
    """predict_step gives each readable row's body output (under `probs`, the name
    ShardWriter collects a row's output by) and the rows that could not be read."""

    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body, self.dim = body, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        x = batch["image"]
        out = self(x).float() if len(x) else torch.zeros((0, self.dim), device=self.device)
        return {
            "index": batch["index"],
            "probs": out.flatten(1),
            "bad_index": batch.get("bad_index", batch["index"][:0]),
            "bad_why": batch.get("bad_why", []),
        }


def body_digest(net: nn.Module) -> str:
    """sha256 of the body's tensors (parameters and buffers: BatchNorm statistics too)."""
    h = hashlib.sha256()
    for name, t in sorted(net.features.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # (the buffer itself, no copy)
    return h.hexdigest()


def set_digest(images: ImageSet) -> str:
    """sha256 of what a set's rows are: its keys, and its pixels when they are in memory (a
    streamed set: the listing of its files, whose changes check_unchanged refuses)."""
    h = hashlib.sha256(str(len(images)).encode())
    h.update("\n".join(images.keys(np.arange(len(images)))).encode())
    if isinstance(images, ImageArrays):  # (in chunks of the contiguous tensor: no copy)
        for i in range(0, len(images), PART_ROWS):
            h.update(images.images[i : i + PART_ROWS].numpy())
    for manifest in manifests(images):
        h.update(json.dumps(manifest.meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(cfg: RunSpec, data: DataSpec, model: str, body: str, images: ImageSet) -> str:
    """The digest naming a split's feature folder: everything the features depend on."""
    what = {
        "body": body,
        "model": model,
        "channels": int(data.channels),
        "image_size": data.image_size,
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
        "precision": str(cfg.trainer.precision),
        "images": set_digest(images),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def part_file(folder: Path, part: int) -> Path:
    return folder / f"part-{part:05d}.npy"


def open_parts(folder: Path, source: ImageSet) -> FeatureSet:
    """A complete feature folder, memory-mapped."""
    meta = io.read_json(folder / META)
    parts = [np.load(part_file(folder, p), mmap_mode="r") for p in range(int(meta["parts"]))]
    if sum(len(p) for p in parts) != len(source) or len(source) != int(meta["rows"]):
        raise UserError(
            f"the cached features in {folder} do not match the set they are for; delete the "
            "folder (it is computed again)"
        )
    return FeatureSet.of_parts(parts, source)


def compute_parts(
    cfg: RunSpec, data: DataSpec, net: nn.Module, images: ImageSet, folder: Path
) -> None:
    """The body's outputs for every row of `images` in parts of PART_ROWS rows, each written
    atomically (NaN rows: unreadable images); the parts already there are kept. The ranks take
    the parts in turn; returns when every rank is done."""
    # (fit.py imports this module, and predict.py imports fit.py)
    from pipeline.engine.fit import batches, datamodule
    from pipeline.engine.predict import NO_SHARD, ShardWriter

    n, bs, dim = len(images), int(cfg.train.eval_batch_size), int(net.num_features)
    num_parts = max(1, math.ceil(n / PART_ROWS))
    todo = dist.broadcast_object(
        [p for p in range(num_parts) if not part_file(folder, p).exists()]
        if dist.is_rank_zero()
        else None
    )
    rows_of = {p: np.arange(p * PART_ROWS, min(n, (p + 1) * PART_ROWS)) for p in todo}
    batches_, part_of_batch = [], []
    for p in todo[dist.rank() :: dist.world_size()]:
        for i in range(0, len(rows_of[p]), bs):
            batches_.append(rows_of[p][i : i + bs])
            part_of_batch.append(p)
    if todo and not batches_ and n:  # a rank without a part still takes part (see predict.py)
        batches_, part_of_batch = [np.arange(1)], [NO_SHARD]

    def write(part: int, index: np.ndarray, out: np.ndarray, bad: Any) -> None:
        rows = rows_of[part]
        table = np.full((len(rows), dim), np.nan, np.float32)
        table[index - part * PART_ROWS] = out
        with io.atomic_path(part_file(folder, part)) as tmp, open(tmp, "wb") as f:
            np.save(f, table)

    if n == 0 and todo and dist.is_rank_zero():  # (an empty set: one empty part)
        write(0, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), None)
    problem = None
    if batches_:
        dm = datamodule(cfg, data, 0, None, predict=batches(data, images),
                        predict_batches=batches_)  # fmt: skip
        writer = ShardWriter(part_of_batch, write)
        trainer = build_trainer(cfg.trainer.args, progress=cfg.progress, callbacks=[writer])
        try:
            trainer.predict(BodyOutputs(net.features, dim), datamodule=dm, return_predictions=False)
        except UserError as e:  # an unreadable image with data.on_bad_image=fail
            problem = e
    problems = [p for p in dist.all_gather_object(problem and str(problem)) if p]
    if problems:
        raise UserError(problems[0]) from None


def split_features(
    cfg: RunSpec,
    data: DataSpec,
    net: nn.Module,
    images: ImageSet,
    split: str,
    run: RunDir,
    model: str,
    body: str | None = None,
) -> FeatureSet:
    """`images`' features under the body of `net` (a model=`model`): read from
    run_dir/features when a folder with the same key is complete, else computed (the missing
    parts) and then read."""
    body = body or body_digest(net)
    key = cache_key(cfg, data, model, body, images)
    folder = run / FEATURES_DIR / f"{split}-{key}"
    if not run.exists(folder / META):
        log.info("computing the features of the %s set (%d images) into %s", split, len(images),
                 folder)  # fmt: skip
        compute_parts(cfg, data, net, images, folder)
        meta = {
            "split": split,
            "rows": len(images),
            "dim": int(net.num_features),
            "parts": max(1, math.ceil(len(images) / PART_ROWS)),
            "dtype": "float32",
            "model": model,
            "body_sha256": body,
        }
        run.write_json(folder / META, meta)
    return open_parts(folder, images)


def body_is_frozen(net: nn.Module) -> bool:
    """Whether no parameter of the body trains (finetune.mode=linear on pretrained weights)."""
    return not any(p.requires_grad for p in net.features.parameters())


def feature_task(
    cfg: RunSpec,
    data: DataSpec,
    net: nn.Module,
    task: Task,
    run: RunDir,
    model: str,
    splits: tuple[str, ...] = ("labelled", "val", "test", "unlabelled"),
) -> Task:
    """The task with the sets named in `splits` replaced by their features under `net`'s body
    (a model=`model`), each computed once, then read back."""
    body = body_digest(net)
    sets = {s: getattr(task, s) for s in splits if getattr(task, s) is not None}
    return dataclasses.replace(
        task,
        **{s: split_features(cfg, data, net, x, s, run, model, body) for s, x in sets.items()},
    )


def training_inputs(
    cfg: RunSpec,
    data: DataSpec,
    net: nn.Module,
    task: Task,
    run: RunDir,
    phase: str,
    with_pool: bool,
) -> tuple[nn.Module, Task] | None:
    """In cache mode (the round's `model.cache_features`, a frozen body): the network's head
    alone and the task's sets as cached features, the pool's too when the training set holds
    pseudo-labelled rows (`with_pool`); None otherwise (train on images). Pretraining trains
    its body: never cached."""
    if phase == "pretraining" or not cfg.model.cache_features:
        return None
    if not body_is_frozen(net):
        raise UserError(
            f"model.cache_features=true needs a frozen body, and this {phase} trains its body "
            "(finetune.mode=linear applies to pretrained weights: init=pretrained, "
            "stage=baseline|finetune, or model.weights); pass model.cache_features=false"
        )
    splits = ("labelled", "val", "test", *(("unlabelled",) if with_pool else ()))
    model = str(cfg.model.name)
    return HeadOnly(net), feature_task(cfg, data, net, task, run, model, splits)


def labelling_inputs(
    cfg: RunSpec, net: nn.Module, task: Task, run: RunDir, teacher_ckpt: Path
) -> tuple[nn.Module, Task] | None:
    """For a teacher trained on cached features (its checkpoint's `model.cache_features`):
    its head alone and the pool (with pseudo_label.ood_score also the labelled and val sets)
    as cached features, so labelling reads them instead of running the body; None otherwise.
    Test-time views are off there: a feature is the clean image's."""
    model = recorded_model(io.load_checkpoint(teacher_ckpt)) or {}
    if not model.get("cache_features"):
        return None
    ood = cfg.pseudo_label.ood_score != "none"
    splits = ("unlabelled", *(("labelled", "val") if ood else ()))
    name = str(model.get("name"))
    return HeadOnly(net), feature_task(cfg, cfg.data, net, task, run, name, splits)
