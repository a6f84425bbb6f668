"""Images decoded from disk when a batch asks for them: a folder of files or WebDataset tar
shards, listed once in a manifest (manifest.py). Nothing holds the decoded set: DataLoader
workers read and decode each batch's files, so memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.arrays import ImageArrays, ImageSet
from pipeline.data.decode import decode_to_shape, held_native_stderr
from pipeline.data.manifest import SHARD_IMAGE_EXTENSIONS, Manifest

log = logging.getLogger(__name__)

_OPEN_SHARDS: OrderedDict[str, Any] = OrderedDict()  # this process's open tar shards (LRU)
_MAX_OPEN_SHARDS = 16


def _shard(path: str) -> Any:
    """An indexed tar shard (wids), kept open for the next batches of this process."""
    from wids.wids import IndexedTarSamples

    if path in _OPEN_SHARDS:
        _OPEN_SHARDS.move_to_end(path)
        return _OPEN_SHARDS[path]
    close_shards(keep=_MAX_OPEN_SHARDS - 1)
    _OPEN_SHARDS[path] = tar = IndexedTarSamples(path=path)
    release_shards()  # (the index pass read every header)
    return tar


def close_shards(keep: int = 0) -> None:
    """Close this process's open tar shards, the least recently used first, until `keep` are
    left: all of them by default (a set served from its decoded-image cache reads them no
    more). Each holds wids' index of its members as Python objects, ~320 bytes a member: 16
    open shards of 10k images, 51 MB kept for the rest of the run."""
    while len(_OPEN_SHARDS) > keep:
        _OPEN_SHARDS.popitem(last=False)[1].close()


def release_shards() -> None:
    """Let go of the pages of this process's open tar shards (they stay in the page cache).

    wids maps each shard, and the kernel maps a whole large page-cache folio on a fault, so
    an open shard read through ends up wholly in the process's resident set: 16 shards of
    14 MB, 234 MB, in a round over 10^6 images (docs/performance.md). Called after each batch,
    a process holds only what that batch touched."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for tar in list(_OPEN_SHARDS.values()):
        mapped = getattr(getattr(tar, "reader", None), "mmapped_file", None)
        if mapped is not None:
            with contextlib.suppress(ValueError, OSError):  # (closed meanwhile)
                mapped.madvise(mmap.MADV_DONTNEED)


def read_sample(manifest: Manifest, i: int) -> tuple[bytes, str]:
    """The image bytes of manifest row `i` and their extension."""
    if manifest.meta["kind"] == "folder":
        key = manifest.key(i)
        with open(os.path.join(manifest.meta["root"], key), "rb") as f:
            return f.read(), os.path.splitext(key)[1]
    shard = manifest.meta["shards"][int(manifest.array("shard")[i])]
    sample = _shard(shard)[int(manifest.array("member")[i])]
    for ext in SHARD_IMAGE_EXTENSIONS:
        if f".{ext}" in sample:
            return sample[f".{ext}"].read(), ext
    raise ValueError("the sample has no image")


class StreamedImages(ImageSet):
    """Rows of a manifest, decoded to (channels, size, size) as batches are loaded."""

    def __init__(
        self,
        manifest: Manifest,
        channels: int,
        size: int,
        rows: np.ndarray | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.manifest, self.channels, self.size = manifest, channels, size
        self.rows = np.arange(len(manifest)) if rows is None else np.asarray(rows, np.int64)
        if labels is None and rows is None and manifest.labels is not None:
            labels = torch.from_numpy(manifest.labels.copy())
        self.labels = labels

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def where(self) -> str:
        meta = self.manifest.meta
        return meta["root"] if meta["kind"] == "folder" else f"{len(meta['shards'])} shards"

    def keys(self, rows: np.ndarray) -> np.ndarray:
        return self.manifest.keys(self.rows[np.asarray(rows, np.int64)])

    def subset(self, rows: np.ndarray) -> StreamedImages:
        rows = np.asarray(rows, np.int64)
        labels = self.labels[torch.from_numpy(rows)] if self.labels is not None else None
        return StreamedImages(self.manifest, self.channels, self.size, self.rows[rows], labels)

    def encoded(self, rows: np.ndarray) -> tuple[list[torch.Tensor], list[str], list[str]]:
        """The files of `rows` undecoded (uint8 tensors of their bytes), their extensions and
        keys: for decoding on the device (data.decode_on=device)."""
        data, exts, keys = [], [], []
        for row in np.asarray(rows, np.int64):
            i = int(self.rows[row])
            try:
                raw, ext = read_sample(self.manifest, i)
            except (OSError, ValueError):
                raw, ext = b"", "unreadable"
            data.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            exts.append(ext)
            keys.append(f"{self.manifest.key(i)} ({self.where})")
        release_shards()  # (none open for a folder: nothing to do)
        return data, exts, keys

    def load(
        self, rows: np.ndarray, hold_stderr: bool = True
    ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        out = torch.zeros((len(rows), self.channels, self.size, self.size), dtype=torch.uint8)
        bad: list[tuple[int, str]] = []
        with held_native_stderr(hold_stderr) as native:
            for pos, row in enumerate(np.asarray(rows, np.int64)):
                i = int(self.rows[row])
                try:
                    data, ext = read_sample(self.manifest, i)
                    image = decode_to_shape(data, ext, self.channels, self.size)
                except OSError as e:
                    image = f"cannot open it ({e.strerror or type(e).__name__})"
                if isinstance(image, str):
                    bad.append((pos, f"{self.manifest.key(i)} ({self.where}): {image}"))
                else:
                    out[pos] = image
        if native and not bad:
            sys.stderr.write("".join(native))  # not about a bad file: let it through
        release_shards()  # (none open for a folder: nothing to do)
        return out, bad


class ConcatImages(ImageSet):
    """Sets one after the other (the labelled set and the kept pseudo-labelled samples)."""

    def __init__(self, parts: list[ImageSet]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        labels = [p.labels for p in parts]
        self.labels = None
        if any(x is not None for x in labels):
            self.labels = torch.cat(
                [
                    x if x is not None else torch.full((len(p),), -1)
                    for x, p in zip(labels, parts, strict=True)
                ]
            )

    @property
    def in_memory(self) -> bool:  # type: ignore[override]
        # Parts that all read rows without decoding (in memory, or a decoded-image cache).
        return all(p.in_memory for p in self.parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _split(self, rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        rows = np.asarray(rows, np.int64)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        return [
            (p, np.flatnonzero(part == p), rows[part == p] - self.starts[p])
            for p in np.unique(part)
        ]

    def load(self, rows: np.ndarray) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        out: torch.Tensor | None = None
        bad: list[tuple[int, str]] = []
        for p, positions, local in self._split(rows):
            images, part_bad = self.parts[p].load(local)
            if out is None:
                out = images.new_zeros((len(rows), *images.shape[1:]))
            out[torch.from_numpy(positions)] = images
            bad += [(int(positions[i]), why) for i, why in part_bad]
        assert out is not None, "no rows"
        return out, bad

    def keys(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), dtype=object)
        for p, positions, local in self._split(rows):
            out[positions] = self.parts[p].keys(local)
        return out.astype(str)

    def subset(self, rows: np.ndarray) -> ImageSet:
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        if not np.array_equal(order, np.arange(len(rows))):
            raise ValueError("ConcatImages.subset takes rows in increasing order")
        return concat([self.parts[p].subset(local) for p, _, local in self._split(rows)])


def concat(parts: list[ImageSet]) -> ImageSet:
    """The sets one after the other; in memory when they all are (one tensor, fast indexing)."""
    parts = [p for p in parts if len(p)] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, ImageArrays) for p in parts):
        labels = None
        if any(p.labels is not None for p in parts):
            labels = torch.cat(
                [p.labels if p.labels is not None else torch.full((len(p),), -1) for p in parts]
            )
        names = None
        if all(p.names is not None for p in parts):
            names = np.concatenate([p.names for p in parts])
        return ImageArrays(torch.cat([p.images for p in parts]), labels, names)
    return ConcatImages(parts)


def memory_bytes(n: int, channels: int, size: int) -> int:
    """What `n` decoded images of the configured shape take in memory."""
    return n * channels * size * size


def decode_all(images: StreamedImages, skip_bad: bool, what: str) -> ImageArrays:
    """Decode a streamed set into memory (a thread pool; decoders release the GIL). A bad file
    stops it naming the file, or is dropped and counted when skip_bad."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.errors import UserError

    n = len(images)
    chunks = [np.arange(i, min(n, i + 256)) for i in range(0, n, 256)]

    def load(rows: np.ndarray) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        return images.load(rows, hold_stderr=False)  # held once around the threads

    workers = min(8, os.cpu_count() or 1)
    with held_native_stderr() as native, ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(load, chunks))
    if native and not any(bad for _, bad in results):
        sys.stderr.write("".join(native))  # not about a bad file: let it through
    keep = np.ones(n, bool)
    for rows, (_, bad) in zip(chunks, results, strict=True):
        for pos, why in bad:
            if not skip_bad:
                raise UserError(
                    f"cannot read image {why}; fix or delete it, or set data.on_bad_image=skip"
                )
            log.warning("skipping unreadable image %s", why)
            keep[rows[pos]] = False
    tensor = (
        torch.cat([r[0] for r in results])
        if results
        else torch.empty((0, images.channels, images.size, images.size), dtype=torch.uint8)
    )
    rows = np.flatnonzero(keep)
    labels = images.labels[torch.from_numpy(rows)] if images.labels is not None else None
    return ImageArrays(tensor[torch.from_numpy(rows)], labels, images.keys(rows))


def set_path(images: ImageSet) -> Path | None:
    """The folder a streamed set reads from (None for other sets)."""
    if isinstance(images, StreamedImages) and images.manifest.meta["kind"] == "folder":
        return Path(images.manifest.meta["root"])
    return None


def manifests(images: ImageSet) -> list[Manifest]:
    """The manifests a set reads from (none for sets made in memory)."""
    from pipeline.data.cache import CachedImages

    if isinstance(images, StreamedImages | CachedImages):
        return [images.manifest]
    if isinstance(images, ConcatImages):
        return [m for p in images.parts for m in manifests(p)]
    return []


def check_unchanged(images: ImageSet, what: str) -> None:
    """Refuse a set whose files changed on disk since its manifest was made (exit 2)."""
    from pipeline.data.manifest import changes
    from pipeline.errors import UserError

    for manifest in manifests(images):
        changed = changes(manifest)
        if changed:
            raise UserError(
                f"{what} changed on disk since this run listed it ({changed}); restore it, or "
                "start a new run (another run_dir=, or overwrite=true)"
            )
