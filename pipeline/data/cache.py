"""`data.cache=decoded`: a streamed set decoded once, into uint8 array shards on disk.

The first pass over a streamed set (a folder or tar shards listed in a manifest) decodes every
image exactly as the streamed path does (`StreamedImages.load`: the same `decode_to_shape`, so
the pixels are the same) and writes them, R rows per shard, as `.npy` files of uint8
(R, C, S, S) under `data.cache_dir/decoded/<key>/`. Later epochs, rounds, stages and jobs read
rows from those files by positional reads (`os.preadv` straight into the batch): the files' pages
are the operating system's page cache, shared by every rank and DataLoader worker; a process
holds only the batch it reads.

The key hashes the source (its manifest's keys, and the state of its folders or shards now) and
the decode settings (image size, channels, decoder version, torchvision and Pillow versions): a
changed source or size never meets a stale cache. A shard is trusted only with its marker
(`shard-NNNNN.json`, written after the shard) whose size and CRC-32 match the file: a missing,
partial or corrupt shard is decoded again. Builders write to a temporary name and rename; a
lock per shard (flock) lets several jobs sharing `data.cache_dir` build different shards at
once and wait for each other's, and a job killed mid-shard leaves only its temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import sys
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.arrays import ImageSet
from pipeline.data.decode import DECODER_VERSION, held_native_stderr
from pipeline.data.manifest import file_state, folder_state
from pipeline.data.streamed import StreamedImages, close_shards
from pipeline.errors import UserError
from pipeline.runtime.io import atomic_path, write_json

log = logging.getLogger(__name__)

CACHE_CHOICES = ("none", "decoded")
FORMAT = 1
SHARD_BYTES = 64 * 2**20  # one shard's decoded images: what a builder holds in memory at once
_CHUNK = 256  # rows a decoding thread takes at a time
_MAX_OPEN = 64  # shard files a process keeps open


def shard_rows(channels: int, size: int) -> int:
    """Rows per shard: about SHARD_BYTES of decoded images."""
    return max(1, SHARD_BYTES // (channels * size * size))


def cache_ident(images: StreamedImages, rows_per_shard: int) -> dict[str, Any]:
    """What a cache is made from: the source as it is now, and how it is decoded."""
    import PIL
    import torchvision

    meta = images.manifest.meta
    if meta["kind"] == "folder":
        # The folders' state now, not the manifest's: a folder touched since it was listed
        # (a file replaced under the same name) makes a new cache rather than trust the old.
        source, state = meta["root"], folder_state(Path(meta["root"]))
    else:
        source = meta["shards"]
        state = {p: file_state(Path(p)) for p in meta["shards"]}
    digest = hashlib.sha256()
    with open(images.manifest.path / "keys.npy", "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return {
        "format": FORMAT,
        "kind": meta["kind"],
        "source": source,
        "state": state,
        "keys_sha256": digest.hexdigest(),
        "count": len(images.manifest),
        "channels": images.channels,
        "size": images.size,
        "decoder": DECODER_VERSION,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "rows_per_shard": rows_per_shard,
    }


def open_cache(
    images: StreamedImages,
    cache_dir: Path,
    skip_bad: bool,
    rows_per_shard: int | None = None,
) -> CachedImages:
    """The set read from its decoded-image cache in `cache_dir`, made (or completed, or
    repaired) first. A bad image stops it naming the file, or (skip_bad) is kept as a row the
    batches drop and count, as the streamed path does."""
    if not images.size:
        raise UserError("data.cache=decoded needs data.image_size; set it")
    rows_per_shard = rows_per_shard or shard_rows(images.channels, images.size)
    ident = cache_ident(images, rows_per_shard)
    name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    entry = Path(cache_dir).expanduser() / "decoded" / name
    cache = Cache(entry, ident)
    full = StreamedImages(images.manifest, images.channels, images.size)
    try:
        entry.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot write the decoded-image cache in {cache_dir} ({e.strerror}); set "
            "data.cache_dir= a folder you can write to, or data.cache=none"
        ) from None
    if not (entry / "meta.json").exists():
        write_json(entry / "meta.json", ident)  # what the folder holds, for people
    bad: dict[int, str] = {}
    built = 0
    # First the shards no other job holds, then wait for the ones others are building.
    pending = list(range(cache.num_shards))
    for blocking in (False, True):
        waiting = []
        for shard in pending:
            with cache.lock(shard, blocking) as held:
                if not held:
                    waiting.append(shard)
                    continue
                marker = cache.valid_marker(shard)
                if marker is None:
                    marker = cache.build(full, shard, skip_bad)
                    built += 1
            start = shard * rows_per_shard
            bad.update({start + int(row): why for row, why in marker["bad"]})
        pending = waiting
    if built:
        close_shards()  # (the tar shards just decoded are read from the cache from now on)
        log.info("decoded %d of %d cache shards of %s into %s", built, cache.num_shards,
                 images.where, entry)  # fmt: skip
    return CachedImages(images, entry, rows_per_shard, bad)


class Cache:
    """The files of one cache entry: shard-NNNNN.npy, its marker shard-NNNNN.json, .lock-NNNNN."""

    def __init__(self, entry: Path, ident: dict[str, Any]) -> None:
        self.entry, self.ident = entry, ident
        self.count, self.rows_per_shard = int(ident["count"]), int(ident["rows_per_shard"])
        self.shape = (int(ident["channels"]), int(ident["size"]), int(ident["size"]))
        self.num_shards = math.ceil(self.count / self.rows_per_shard)

    def rows(self, shard: int) -> int:
        return min(self.count, (shard + 1) * self.rows_per_shard) - shard * self.rows_per_shard

    @contextlib.contextmanager
    def lock(self, shard: int, blocking: bool) -> Iterator[bool]:
        """Hold the shard's lock (an flock: the kernel lets go of a killed holder's); yields
        False when another process holds it and `blocking` is off."""
        fd = os.open(self.entry / f".lock-{shard:05d}", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            except OSError:  # a file system without flock: at worst two builders write the
                pass  # same bytes, and each rename is atomic
            yield True
        finally:
            os.close(fd)  # (releases the lock)

    def valid_marker(self, shard: int) -> dict[str, Any] | None:
        """The shard's marker when the shard is whole: the marker is there, and the file's
        header, size and CRC-32 are what it says; else None (the shard is made again)."""
        path = shard_path(self.entry, shard)
        try:
            marker = json.loads(path.with_suffix(".json").read_text())
            with open(path, "rb") as f:
                offset = data_offset(f, (self.rows(shard), *self.shape))
                size = offset + self.rows(shard) * int(np.prod(self.shape))
                if os.fstat(f.fileno()).st_size != size or marker["bytes"] != size:
                    raise ValueError("size")
                crc = 0
                # Read in blocks rather than mapped: checking a shard must not grow the
                # process's resident memory by a shard.
                for block in iter(lambda: f.read(2**22), b""):
                    crc = zlib.crc32(block, crc)
            if crc != marker["crc32"] or marker["rows"] != self.rows(shard):
                raise ValueError("checksum")
            return marker
        except (OSError, ValueError, KeyError, TypeError) as e:
            if path.exists() or path.with_suffix(".json").exists():
                log.warning("cache shard %s is damaged or partial (%s): decoding it again", path,
                            type(e).__name__ if not str(e) else e)  # fmt: skip
            return None

    def build(self, images: StreamedImages, shard: int, skip_bad: bool) -> dict[str, Any]:
        """Decode the shard's rows (threads: decoders let go of the GIL), write the shard
        atomically, then its marker. Returns the marker."""
        path = shard_path(self.entry, shard)
        # The marker goes first: a kill after the new shard is renamed in but before its
        # marker is written must not leave an old marker that vouches for it.
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".json").unlink()
        start = shard * self.rows_per_shard
        array = np.zeros((self.rows(shard), *self.shape), np.uint8)
        chunks = [
            np.arange(start + i, start + min(len(array), i + _CHUNK))
            for i in range(0, len(array), _CHUNK)
        ]

        def decode(rows: np.ndarray) -> list[tuple[int, str]]:
            decoded, bad = images.load(rows, hold_stderr=False)  # held once around the threads
            array[rows[0] - start : rows[-1] + 1 - start] = decoded.numpy()
            return [(int(rows[pos] - start), why) for pos, why in bad]

        workers = min(8, os.cpu_count() or 1)
        with held_native_stderr() as native, ThreadPoolExecutor(max_workers=workers) as pool:
            bad = [b for chunk in pool.map(decode, chunks) for b in chunk]
        if native and not bad:
            sys.stderr.write("".join(native))  # not about a bad file: let it through
        if bad and not skip_bad:
            raise UserError(
                f"cannot read image {bad[0][1]}; fix or delete it, or set data.on_bad_image=skip"
            )
        for _, why in bad:
            log.warning("unreadable image %s: its batches will skip it", why)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        marker = {
            "rows": len(array),
            "bytes": path.stat().st_size,
            "crc32": zlib.crc32(array),
            "bad": bad,
        }
        write_json(path.with_suffix(".json"), marker)
        return marker


def shard_path(entry: Path, shard: int) -> Path:
    return entry / f"shard-{shard:05d}.npy"


def data_offset(f: Any, shape: tuple[int, ...]) -> int:
    """Where the array of an open .npy file starts, after checking its header is that of a
    C-ordered uint8 array of `shape` (ValueError if not)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f)
    else:
        header = np.lib.format.read_array_header_2_0(f)
    have_shape, fortran, dtype = header
    if tuple(have_shape) != tuple(shape) or fortran or dtype != np.uint8:
        raise ValueError(f"header says {dtype} {have_shape}, expected uint8 {shape}")
    return f.tell()


class CachedImages(ImageSet):
    """A streamed set's rows read from its decoded-image cache: the same keys, labels and
    images (zeros and a reason for the bad ones) as the StreamedImages it stands for."""

    # Rows are read as fast as a tensor is indexed (one positional read per run of rows, from
    # the page cache, no decoding): as for a set in memory, a DataLoader worker's round trip
    # would cost more than it saves (data.num_workers=auto gives none).
    #
    # Not memory maps: a process's resident set counts every page it has mapped, and the
    # kernel maps a whole large page-cache folio on a fault, so random rows (a shuffled epoch)
    # map nearly the whole file at once (measured: one batch of 256 random rows of a 123 MB
    # cache mapped 100 MB; docs/performance.md). A read copies the rows and nothing else.
    in_memory = True

    def __init__(
        self, source: StreamedImages, entry: Path, rows_per_shard: int, bad: dict[int, str]
    ) -> None:
        self.source, self.entry, self.rows_per_shard, self.bad = source, entry, rows_per_shard, bad
        self.labels = source.labels
        self.channels, self.size = source.channels, source.size
        self._files: OrderedDict[int, tuple[int, int]] = OrderedDict()  # shard -> (fd, offset)

    def __getstate__(self) -> dict[str, Any]:
        # To DataLoader workers: paths (the source's manifest pickles as its path), no files.
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state

    def __del__(self) -> None:
        self._close()

    @property
    def manifest(self) -> Any:
        return self.source.manifest

    @property
    def where(self) -> str:
        return self.source.where

    def __len__(self) -> int:
        return len(self.source)

    def keys(self, rows: np.ndarray) -> np.ndarray:
        return self.source.keys(rows)

    def subset(self, rows: np.ndarray) -> CachedImages:
        rows = np.asarray(rows, np.int64)
        out = CachedImages(self.source.subset(rows), self.entry, self.rows_per_shard, self.bad)
        # (this set's labels, which a relabelled copy may have changed, not the source's)
        out.labels = self.labels[torch.from_numpy(rows)] if self.labels is not None else None
        return out

    def load(
        self, rows: np.ndarray, hold_stderr: bool = True
    ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """As StreamedImages.load (`hold_stderr` is there for that: nothing is decoded here)."""
        full = self.source.rows[np.asarray(rows, np.int64)]
        shard, offset = np.divmod(full, self.rows_per_shard)
        out = np.empty((len(full), self.channels, self.size, self.size), np.uint8)
        row_bytes = self.channels * self.size * self.size
        view = memoryview(out.reshape(-1))
        for s in np.unique(shard).tolist():
            at = np.flatnonzero(shard == s)
            at = at[np.argsort(offset[at], kind="stable")]  # (the file in order)
            fd, base = self._file(s)
            # Runs of rows that are next to each other both in the file and in the batch are
            # one read (a sequential pass, labelling, reads whole stretches at once).
            off = offset[at]
            starts = np.flatnonzero(
                np.concatenate(([True], (np.diff(off) != 1) | (np.diff(at) != 1)))
            )
            lengths = np.diff(np.append(starts, len(at)))
            for first, where, n in zip(
                (at[starts] * row_bytes).tolist(),
                (base + off[starts] * row_bytes).tolist(),
                (lengths * row_bytes).tolist(),
                strict=True,
            ):
                if os.preadv(fd, [view[first : first + n]], where) != n:
                    raise OSError(f"{shard_path(self.entry, s)} is shorter than its marker")
        bad = []
        if self.bad:  # (rows of images that could not be read: zeros, and why)
            bad = [(pos, self.bad[int(r)]) for pos, r in enumerate(full) if int(r) in self.bad]
        return torch.from_numpy(out), bad

    def _file(self, shard: int) -> tuple[int, int]:
        """The shard's open file and where its rows start (its .npy header checked once)."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        while len(self._files) >= _MAX_OPEN:
            os.close(self._files.popitem(last=False)[1][0])
        rows = min(len(self.source.manifest), (shard + 1) * self.rows_per_shard)
        shape = (rows - shard * self.rows_per_shard, self.channels, self.size, self.size)
        fd = os.open(shard_path(self.entry, shard), os.O_RDONLY)
        try:
            with open(fd, "rb", closefd=False) as f:
                offset = data_offset(f, shape)
        except BaseException:
            os.close(fd)
            raise
        self._files[shard] = (fd, offset)
        return fd, offset

    def _close(self) -> None:
        files = getattr(self, "_files", {})
        while files:
            with contextlib.suppress(OSError):
                os.close(files.popitem()[1][0])
