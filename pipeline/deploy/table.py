"""stage=predict's files: one part per shard of the input (`.npz`, written atomically by the rank
that predicted it; what a killed run keeps), and the table they are joined into, CSV or Parquet,
streamed part by part (memory holds one part).

Columns: `path` (the image's key: its path relative to the input folder, or SHARD/KEY),
`class` and `confidence` (the predicted class and its probability), `top1_class`,
`top1_prob` ... `topK_class`, `topK_prob` (most probable first), `error` (why an image could
not be read; empty for the others, whose other columns are then empty).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.engine.predict import ShardPlan, Unreadable
from pipeline.errors import UserError
from pipeline.runtime import io

PLAN = "plan.json"  # what the parts were made by: parts of another command are not reused


def parts_dir(out: Path) -> Path:
    """The folder of `out`'s parts while they are being made: `predictions.csv.parts/`."""
    return out.with_name(out.name + ".parts")


def part_file(parts: Path, shard: int, plan: ShardPlan) -> Path:
    return parts / f"part-{shard:05d}-of-{plan.num_shards:05d}.npz"


def identity(**what: Any) -> str:
    """A digest of what makes the parts (checkpoint, input listing, settings)."""
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def parts_to_do(parts: Path, plan: ShardPlan, made_by: str) -> list[int]:
    """The shards without a part (rank 0). Parts made by another command (another checkpoint,
    input, top-k, ...) are removed first."""
    plan_file = parts / PLAN
    if parts.exists() and (not plan_file.exists() or io.read_json(plan_file) != made_by):
        shutil.rmtree(parts)  # another command's parts (or a plan never written): start over
    if not plan_file.exists():
        io.write_json(plan_file, made_by)
    return [s for s in range(plan.num_shards) if not part_file(parts, s, plan).exists()]


def part_arrays(
    keys: np.ndarray,
    index: np.ndarray,
    probs: np.ndarray,
    bad: Unreadable,
    bad_keys: np.ndarray,
    where: str,
    topk: int,
) -> dict[str, np.ndarray]:
    """A part: the readable rows' index, key and top-k (classes, probabilities), and the
    unreadable rows' index, key and why."""
    top = torch.from_numpy(probs).topk(topk, dim=1)
    why = [w.removeprefix(f"{k} ({where}): ") for k, w in zip(bad_keys, bad.why, strict=True)]
    return {
        "index": index.astype(np.int64),
        "key": keys.astype(str),
        "top_class": top.indices.numpy().astype(np.int64),
        "top_prob": top.values.numpy().astype(np.float32),
        "bad_index": bad.index.astype(np.int64),
        "bad_key": np.asarray(bad_keys).astype(str),
        "bad_why": np.asarray(why, dtype=str),
    }


def columns(topk: int) -> list[str]:
    tops = [f"top{i}_{what}" for i in range(1, topk + 1) for what in ("class", "prob")]
    return ["path", "class", "confidence", *tops, "error"]


def part_frame(part: dict[str, np.ndarray], classes: list[str], topk: int) -> Any:
    """A part as table rows, in input order (readable and unreadable rows interleaved)."""
    import pandas as pd

    n_ok, n_bad = len(part["index"]), len(part["bad_index"])
    order = np.argsort(np.concatenate([part["index"], part["bad_index"]]), kind="stable")
    names = np.asarray(classes, dtype=object)
    none = np.full(n_bad, None, dtype=object)
    nan = np.full(n_bad, np.nan, dtype=np.float32)
    data: dict[str, Any] = {"path": np.concatenate([part["key"], part["bad_key"]]).astype(object)}
    top_class, top_prob = part["top_class"].reshape(n_ok, -1), part["top_prob"].reshape(n_ok, -1)
    data["class"] = np.concatenate([names[top_class[:, 0]], none])
    data["confidence"] = np.concatenate([top_prob[:, 0], nan])
    for i in range(topk):
        data[f"top{i + 1}_class"] = np.concatenate([names[top_class[:, i]], none])
        data[f"top{i + 1}_prob"] = np.concatenate([top_prob[:, i], nan])
    data["error"] = np.concatenate([np.full(n_ok, None, dtype=object), part["bad_why"]])
    return pd.DataFrame({k: v[order] for k, v in data.items()}, columns=columns(topk))


def write_table(
    parts: Path, plan: ShardPlan, out: Path, classes: list[str], topk: int
) -> dict[str, Any]:
    """Join the parts into `out` (CSV or Parquet by its suffix) atomically, then remove them.
    Returns the counts: images, predicted, unreadable, per predicted class."""
    files = [part_file(parts, s, plan) for s in range(plan.num_shards)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(
            f"{len(missing)} of {plan.num_shards} parts are missing in {parts} (e.g. "
            f"{missing[0]}); run the same command again to make them"
        )
    parquet = out.suffix.lower() == ".parquet"
    counts: Counter[str] = Counter()
    num_rows = num_bad = 0
    with io.atomic_path(out) as tmp:
        writer = _parquet_writer(tmp, topk) if parquet else open(tmp, "w", newline="")  # noqa: SIM115
        try:
            for number, file in enumerate(files):
                frame = part_frame(io.read_npz(file), classes, topk)
                num_rows += len(frame)
                num_bad += int(frame["error"].notna().sum())
                counts.update(frame["class"].dropna())
                if parquet:
                    import pyarrow as pa

                    table = pa.Table.from_pandas(frame, schema=writer.schema, preserve_index=False)
                    writer.write_table(table)
                else:
                    frame.to_csv(writer, header=number == 0, index=False, float_format="%.6g")
        finally:
            writer.close()
    if num_rows != plan.n:
        raise RuntimeError(f"the parts hold {num_rows} rows, the input has {plan.n} images")
    shutil.rmtree(parts, ignore_errors=True)
    return {
        "num_images": num_rows,
        "num_predicted": num_rows - num_bad,
        "num_bad_images": num_bad,
        "predicted_per_class": {c: counts.get(c, 0) for c in classes},
    }


def _parquet_writer(path: Path, topk: int) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    kinds = {"path": pa.string(), "class": pa.string(), "confidence": pa.float32()}
    kinds.update({f"top{i}_class": pa.string() for i in range(1, topk + 1)})
    kinds.update({f"top{i}_prob": pa.float32() for i in range(1, topk + 1)})
    kinds["error"] = pa.string()
    schema = pa.schema([(name, kinds[name]) for name in columns(topk)])
    return pq.ParquetWriter(str(path), schema)
