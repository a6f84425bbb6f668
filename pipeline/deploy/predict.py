"""`stage=predict ckpt=M.ckpt input=DIR_OR_SHARDS out=predictions.csv|.parquet`: every image of
a folder (any depth) or of WebDataset tar shards, with its predicted class, confidence and
top-k, as a table.

Everything about the model (classes, channels, image size, mean/std, architecture, the ranges
of the test-time views) comes from the checkpoint; no dataset config is needed. The input is
listed once into a manifest (cached, and snapshotted into the run_dir), cut into shards of
`predict.shard_size` images and predicted as a map over them (engine/predict.py): each rank
writes one part file per shard, atomically, so memory stays flat and a killed run redoes only
the missing parts; rank 0 then joins the parts into `out` (table.py). Unreadable images are
rows with an `error` (data.on_bad_image=skip) or stop the run naming the file (fail).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config.specs import DataSpec, RunSpec
from pipeline.data.manifest import (
    IMAGE_EXTENSIONS,
    Listing,
    Manifest,
    cached,
    changes,
    expand_shards,
    is_shard_spec,
    list_folder,
    list_shards,
    snapshot,
)
from pipeline.deploy import table
from pipeline.deploy.model import ModelCard, read_card
from pipeline.errors import UserError
from pipeline.runtime import io
from pipeline.runtime.rundir import RunDir

log = logging.getLogger("pipeline")

PARQUET_HINT = "pip install -e '.[parquet]' (or pip install pyarrow)"


def run_predict(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    start = time.time()
    out = Path(str(cfg.out)).expanduser().resolve()
    if out.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise UserError(f"out={cfg.out}: writing Parquet needs pyarrow; {PARQUET_HINT}")
    ckpt = Path(str(cfg.ckpt)).expanduser().resolve()
    previous = run.on_rank_zero(lambda: finished(run, out, ckpt))
    if previous is not None:
        log.info("%s is complete (%s); nothing to redo", out, run.path)
        return previous
    card = read_card(cfg.ckpt, cfg.data.node, old_checkpoint_hint(cfg))
    data = engine_data(cfg, card)
    views = tta_views(cfg, card)
    manifest = input_manifest(cfg, run)
    topk = min(int(cfg.predict.topk), card.num_classes)
    plan = shard_plan(cfg, len(manifest))
    parts = table.parts_dir(out)
    made_by = table.identity(
        ckpt=str(ckpt), ckpt_state=_file_state(ckpt), input=manifest.meta, count=len(manifest),
        shards=plan.num_shards, topk=topk, tta_views=int(cfg.predict.tta_views),
        on_bad_image=data.on_bad_image,
    )  # fmt: skip
    todo = run.on_rank_zero(lambda: writable(out, lambda: table.parts_to_do(parts, plan, made_by)))
    log.info("predicting %d images in %d parts (%d to do) with %s", plan.n, plan.num_shards,
             len(todo), ckpt)  # fmt: skip
    try:
        if todo:
            predict_parts(cfg, data, card, manifest, plan, parts, todo, topk, views)
    except UserError:
        drop_unstarted(parts)
        raise
    counts = run.on_rank_zero(lambda: table.write_table(parts, plan, out, card.classes, topk))
    return {
        "stage": "predict",
        "ckpt": str(ckpt),
        "ckpt_state": _file_state(ckpt),
        "input": str(cfg.input),
        "out": str(out),
        "out_state": run.on_rank_zero(lambda: _file_state(out)),
        **counts,
        "classes": card.classes,
        "topk": topk,
        "tta_views": int(cfg.predict.tta_views),
        "wall_time_s": round(time.time() - start, 2),
    }


def drop_unstarted(parts: Path) -> None:
    """After bad input (exit 2), remove `OUT.parts/` when it holds no part yet (only its
    plan.json): the command then leaves nothing behind. Parts already made are kept for the
    re-run. Rank 0, without a collective: the error may be raised on one rank only."""
    from pipeline.runtime import dist

    if not dist.is_rank_zero() or not parts.is_dir():
        return
    if all(p.name == table.PLAN for p in parts.iterdir()):
        shutil.rmtree(parts, ignore_errors=True)


def writable(out: Path, work: Any) -> Any:
    """`work()`, with a folder that cannot be written to as bad input (exit 2)."""
    try:
        return work()
    except PermissionError as e:
        raise UserError(
            f"cannot write {e.filename or out} (permission denied); pass out= a path in a "
            "folder you can write to"
        ) from None


def predict_parts(
    cfg: RunSpec,
    data: DataSpec,
    card: ModelCard,
    manifest: Manifest,
    plan: Any,
    parts: Path,
    todo: list[int],
    topk: int,
    views: Any,
) -> None:
    """Predict the shards in `todo`, the ranks of this job taking them in turn; each writes a
    part per shard as soon as it is done."""
    import numpy as np

    from pipeline.data.streamed import StreamedImages
    from pipeline.engine.fit import batches
    from pipeline.engine.predict import Unreadable, predict_shards

    images = StreamedImages(manifest, card.channels, card.image_size)

    def write(shard: int, index: np.ndarray, probs: np.ndarray, bad: Unreadable) -> None:
        arrays = table.part_arrays(
            images.keys(index), index, probs, bad, images.keys(bad.index), images.where, topk
        )
        io.write_npz(table.part_file(parts, shard, plan), arrays)

    net = card.build_net()
    todo_rows = {s: plan.rows(s) for s in todo}  # the ranks take them in turn
    predict_shards(cfg, data, net, batches(data, images), todo_rows, write, views)


def finished(run: RunDir, out: Path, ckpt: Path) -> dict[str, Any] | None:
    """The summary of this run when it already wrote `out`, and `out`, the checkpoint and the
    input are as they were then (else the command predicts again)."""
    done, listing = run / "summary.json", run / "manifest" / "input"
    if not done.exists() or not out.exists() or not (listing / "meta.json").exists():
        return None
    summary = io.read_json(done)
    same = (
        summary.get("out") == str(out)
        and summary.get("out_state") == _file_state(out)
        and summary.get("ckpt_state") == _file_state(ckpt)
    )
    return summary if same and changes(Manifest(listing)) is None else None


def old_checkpoint_hint(cfg: RunSpec) -> str:
    return (
        "pass the data config it was trained with (data=NAME with its data.mean and data.std; "
        f"for image_folder, data.labelled_dir gives the class names); this command has "
        f"data={cfg.data.name}"
    )


def engine_data(cfg: RunSpec, card: ModelCard) -> DataSpec:
    """The data node the engine reads: the checkpoint's input, the command's data.* runtime
    settings (on_bad_image, num_workers, decode_on)."""
    on_bad = cfg.data.on_bad_image or "fail"
    if on_bad not in ("fail", "skip"):
        raise UserError(f"data.on_bad_image must be 'fail' or 'skip', got {on_bad!r}")
    return DataSpec.of(
        {
            "name": "predict",
            "num_classes": card.num_classes,
            "channels": card.channels,
            "image_size": card.image_size,
            "mean": card.mean,
            "std": card.std,
            "augment": card.augment,
            "on_bad_image": on_bad,
            "num_workers": cfg.data.num_workers,
            "decode_on": cfg.data.decode_on,
        }
    )


def tta_views(cfg: RunSpec, card: ModelCard) -> Any:
    """predict.tta_views fixed views of the checkpoint's data.augment ranges (None: none)."""
    from pipeline.engine.augment import views_fn

    n = int(cfg.predict.tta_views)
    views = views_fn(n, card.augment)
    if n and views is None:
        raise UserError(
            f"predict.tta_views={n}, but checkpoint {card.path} was trained without data.augment "
            "(the views are drawn from its ranges); pass predict.tta_views=0"
        )
    return views


def shard_plan(cfg: RunSpec, n: int) -> Any:
    from pipeline.engine.predict import ShardPlan

    return ShardPlan(n, max(1, math.ceil(n / int(cfg.predict.shard_size))))


def input_spec(value: Any) -> Any:
    """`input` checked: tar shards (a .tar, a brace pattern, a list) or an existing folder."""
    if is_shard_spec(value):
        return value
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise UserError(f"input={value} does not exist; pass a folder of images or .tar shards")
    if not path.is_dir():
        raise UserError(
            f"input={value} is a file; pass the folder that holds it, or .tar shards "
            "(a .tar path, a brace pattern such as 'input=/data/x-{000..009}.tar', or a list)"
        )
    return path.resolve()


def input_manifest(cfg: RunSpec, run: RunDir) -> Manifest:
    """The input's listing in the run (run_dir/manifest/input): the one listed when the run
    started, or a new one when the input changed since (its parts are then redone)."""
    spec = input_spec(cfg.input)
    cache_dir = Path(cfg.data.cache_dir or "~/.cache/pipeline").expanduser()
    own = run / "manifest" / "input"

    def make() -> Listing:
        if is_shard_spec(spec):
            return list_shards(expand_shards(spec, "input"))
        return list_folder(spec, None)

    def prepare() -> int:
        if (own / "meta.json").exists():
            changed = changes(Manifest(own))
            if changed is None:
                return len(Manifest(own))
            log.warning("input=%s changed since this run listed it (%s): listing it again",
                        cfg.input, changed)  # fmt: skip
            shutil.rmtree(own)
        listing = cached(spec, None, cache_dir, make)
        own.parent.mkdir(parents=True, exist_ok=True)
        return len(snapshot(listing, own))

    if run.on_rank_zero(prepare) == 0:
        raise UserError(
            f"input={cfg.input} contains no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); check the path"
        )
    return Manifest(own)


def _file_state(path: Path) -> list[int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]
