"""Stable sample identity: the list of a set's samples, made once, kept on disk.

A sample is its key: the path relative to its folder (`cat/001.jpg`), or `SHARD/KEY` for a
sample of a WebDataset tar shard. A folder is listed with `os.scandir` (files sorted, so the
order is the same everywhere); a shard's samples are indexed with `wids` (webdataset's indexed
reader: one pass over the tar headers, no image read). The listing is written as memory-mapped
`.npy` arrays, so a rank holds no more of it than it reads, and with what a later run checks to
tell whether the set changed: every folder's modification time (adding or removing a file
changes its folder's), every shard's size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.runtime.io import atomic_path, write_json
from pipeline.runtime.memory import release_free_memory

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
FORMAT = 1


def is_shard_spec(value: Any) -> bool:
    """Whether a `data.*_dir` value names tar shards (a .tar path, a brace pattern, a list)."""
    if isinstance(value, list | tuple):
        return True
    text = str(value)
    return text.endswith(".tar") or "{" in text or "::" in text


def expand_shards(spec: Any, key: str) -> list[Path]:
    """Shard paths from a list and/or brace patterns (`/data/pool-{000..099}.tar`); `key` is
    the setting that names them (data.unlabelled_dir, input), for the error messages."""
    from braceexpand import braceexpand

    items = list(spec) if isinstance(spec, list | tuple) else str(spec).split("::")
    paths = [Path(p).expanduser() for item in items for p in braceexpand(str(item))]
    if not paths:
        raise UserError(f"{key}={spec} names no shard; give .tar paths or a brace pattern")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(
            f"{key}={spec}: shard {missing[0]} does not exist{more}; check the path or "
            "the brace pattern (e.g. /data/pool-{000..099}.tar)"
        )
    return paths


@dataclass
class Listing:
    """A set's samples in memory while it is being made (then written as a Manifest)."""

    keys: list[str] | np.ndarray  # (tar sets: UTF-8 bytes, numpy "S": no object per sample)
    labels: np.ndarray | None  # int64, one per key; None: no labels known
    shard: np.ndarray | None  # int32 shard number per key (tar sets)
    member: np.ndarray | None  # int32 sample number inside its shard (tar sets)
    meta: dict[str, Any]  # kind, root / shards, classes, what a later check compares


def _scan(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative directory, entry) of every non-hidden entry under root, depth first. A name
    that is not UTF-8 (keys are stored as UTF-8) and a symlink loop are refused, naming them."""
    # A folder is identified by (device, inode): a linked folder seen above it is a loop.
    stack = [("", root, frozenset({_folder_id(root)}))]
    while stack:
        rel, path, above = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    entry.name.encode()
                except UnicodeEncodeError:
                    raise UserError(
                        f"{os.fsdecode(path)}: the file name {ascii(entry.name)} is not valid "
                        "UTF-8; rename it (or move it out of the folder)"
                    ) from None
                yield rel, entry
                if _is_folder(entry):
                    folder = _folder_id(Path(entry.path))
                    if folder in above:
                        raise UserError(
                            f"{entry.path} is a symlink loop (it leads back to a folder above "
                            "it); remove the link or point it elsewhere"
                        )
                    stack.append((f"{rel}{entry.name}/", Path(entry.path), above | {folder}))


def _folder_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether an entry is a folder (through links); a link that never resolves is refused."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError as e:  # ELOOP: links that point at each other
        raise UserError(
            f"{entry.path} cannot be followed ({e.strerror}); remove the link or point it at "
            "an image or a folder"
        ) from None


def folder_state(root: Path) -> dict[str, int]:
    """Modification time of every (non-hidden) folder under root, root included."""
    state = {"": root.stat().st_mtime_ns}
    for rel, entry in _scan(root):
        if entry.is_dir(follow_symlinks=True):
            state[f"{rel}{entry.name}"] = entry.stat().st_mtime_ns
    return state


def image_paths(root: Path) -> list[str]:
    """Relative paths of every image file under root, sorted (the same order everywhere)."""
    return sorted(
        f"{rel}{e.name}"
        for rel, e in _scan(root)
        if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file()
    )


def list_folder(root: Path, classes: list[str] | None) -> Listing:
    """A folder's images; with `classes`, a class-per-subfolder tree (label = class index)."""
    paths = image_paths(root)
    labels = None
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        labels = np.array([index.get(p.split("/", 1)[0], -1) for p in paths], np.int64)
        keep = labels >= 0  # files beside the class folders are not samples
        paths = [p for p, k in zip(paths, keep, strict=True) if k]
        labels = labels[keep]
    meta = {"kind": "folder", "root": str(root.resolve()), "classes": classes}
    meta["state"] = folder_state(root)
    return Listing(paths, labels, None, None, meta)


def _shard_samples(path: Path) -> tuple[list[str], list[int], list[int]]:
    """(keys, labels, sample numbers) of a WebDataset shard's samples with an image, in its
    order; label -1 where there is no .cls."""
    from wids.wids import IndexedTarSamples, splitname

    try:
        tar = IndexedTarSamples(path=str(path))
        reader = tar.reader
        size = os.path.getsize(path)
        ends = [offset + 512 + n for _, offset, n in reader.by_index]
        if ends and max(ends) > size:
            raise ValueError("a member ends after the end of the file")
        keys, labels, numbers = [], [], []
        for number, group in enumerate(tar.samples):
            names = [reader.by_index[j][0] for j in group]
            key = splitname(names[0])[0]
            members = {
                splitname(n)[1].lstrip(".").lower(): j for n, j in zip(names, group, strict=True)
            }
            if not any(ext in members for ext in SHARD_IMAGE_EXTENSIONS):
                continue  # a sample without an image (metadata only) is not a sample here
            keys.append(key)
            numbers.append(number)
            cls = members.get("cls")
            labels.append(int(reader.get_at_index(cls)[1].decode().strip()) if cls else -1)
        tar.close()
        return keys, labels, numbers
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UserError(
            f"shard {path} is truncated or not a tar file ({first}); re-create or remove it"
        ) from None


def list_shards(paths: list[Path]) -> Listing:
    """The samples of tar shards in the WebDataset layout (KEY.jpg|png|webp + optional KEY.cls)."""
    # Each shard's samples become numpy arrays at once: a million keys held as Python strings
    # (and lists of ints) would cost ~200 MB while listing, and the heap keeps much of it.
    keys: list[np.ndarray] = [np.array([], "S1")]
    labels: list[np.ndarray] = []
    shard: list[np.ndarray] = []
    member: list[np.ndarray] = []
    names = [p.name for p in paths]
    qualify = len(set(names)) < len(names)  # shards of the same name in different folders
    for s, path in enumerate(paths):
        shard_keys, shard_labels, numbers = _shard_samples(path)
        prefix = str(path) if qualify else path.name
        if shard_keys:
            keys.append(np.array([f"{prefix}/{k}".encode() for k in shard_keys]))
        labels.append(np.array(shard_labels, np.int64))
        shard.append(np.full(len(shard_keys), s, np.int32))
        member.append(np.array(numbers, np.int32))
    label_array = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    meta = {
        "kind": "shards",
        "shards": [str(p.resolve()) for p in paths],
        "state": {str(p.resolve()): file_state(p) for p in paths},
    }
    return Listing(
        np.concatenate(keys),
        label_array if (label_array >= 0).any() else None,
        np.concatenate(shard) if shard else np.zeros(0, np.int32),
        np.concatenate(member) if member else np.zeros(0, np.int32),
        meta,
    )


def file_state(path: Path) -> list[int]:
    """A file's size and modification time: what tells a later run it was rewritten."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class Manifest:
    """A listing written to a folder as memory-mapped arrays (keys.npy, labels.npy, ...) and
    meta.json. Pickles as its path: DataLoader workers map the files themselves."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.meta, self._arrays = state["path"], state["meta"], {}

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._arrays:
            file = self.path / f"{name}.npy"
            if not file.exists():
                return None
            self._arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        return self._arrays[name]

    def __len__(self) -> int:
        return int(self.meta["count"])

    def key(self, i: int) -> str:
        return bytes(self.array("keys")[i]).decode()

    def keys(self, rows: np.ndarray) -> np.ndarray:
        """The keys of `rows` as a numpy unicode array."""
        return np.char.decode(np.asarray(self.array("keys")[np.asarray(rows)]), "utf-8")

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.array("labels")
        return None if labels is None else np.asarray(labels)

    @staticmethod
    def write(path: Path, listing: Listing) -> Manifest:
        """Write a listing (each file atomically, meta.json last: its presence marks a whole
        manifest) and open it."""
        path.mkdir(parents=True, exist_ok=True)
        if isinstance(listing.keys, np.ndarray):  # already UTF-8 bytes ("S", at least S1)
            keys = listing.keys
        else:
            encoded = [k.encode() for k in listing.keys]
            keys = np.array(encoded, dtype=f"S{max((len(k) for k in encoded), default=1)}")
        arrays = {"keys": keys}
        for name in ("labels", "shard", "member"):
            value = getattr(listing, name)
            if value is not None:
                arrays[name] = value
        for name, array in arrays.items():
            with atomic_path(path / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        write_json(path / "meta.json", {"format": FORMAT, "count": len(keys), **listing.meta})
        return Manifest(path)


def changes(manifest: Manifest) -> str | None:
    """What changed on disk since the manifest was made ("12 files added, 3 removed"), or
    None. Cheap when nothing changed: one stat per folder (or shard)."""
    meta = manifest.meta
    if meta["kind"] == "shards":
        gone = [p for p in meta["shards"] if not Path(p).is_file()]
        edited = [
            p for p in meta["shards"] if p not in gone and file_state(Path(p)) != meta["state"][p]
        ]
        if not gone and not edited:
            return None
        what = [f"{len(gone)} shards removed"] if gone else []
        what += [f"{len(edited)} shards rewritten (e.g. {Path(edited[0]).name})"] if edited else []
        return ", ".join(what)
    root = Path(meta["root"])
    if not root.is_dir():
        return f"the folder {root} is gone"
    if folder_state(root) == meta["state"]:
        return None
    now = set(list_folder(root, meta.get("classes")).keys)
    before = {manifest.key(i) for i in range(len(manifest))}
    added, removed = len(now - before), len(before - now)
    if not added and not removed:
        return None  # files edited or folders touched: the samples are the same
    return f"{added} files added, {removed} removed"


def cached(spec: Any, classes: list[str] | None, cache_dir: Path, make: Any) -> Manifest:
    """The manifest of a folder or shard list from the cache (`data.cache_dir`), made by
    `make()` and stored there when missing or stale: a folder is listed once, not once per job
    of a sweep or an array. Concurrent jobs may both list it; the first rename wins."""
    ident = json.dumps([str(spec), classes], sort_keys=True)
    entry = cache_dir / "manifests" / hashlib.sha1(ident.encode()).hexdigest()[:16]
    if (entry / "meta.json").exists():
        manifest = Manifest(entry)
        if manifest.meta.get("format") == FORMAT and changes(manifest) is None:
            return manifest
    listing = make()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}.", dir=entry.parent))
    Manifest.write(tmp, listing)
    del listing  # (a million keys as Python strings: their memory goes back to the system)
    release_free_memory()
    stale = entry.with_name(f".stale-{entry.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(entry, stale)  # a stale entry makes room (another job may have done it)
    try:
        os.rename(tmp, entry)
    except OSError:  # another job renamed its (identical) listing first
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    return Manifest(entry)


def snapshot(manifest: Manifest, dest: Path) -> Manifest:
    """A copy of a manifest for a run (hard links where the file system allows: the cache's
    files are replaced, never changed, so the run's copy stays as it was)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}.", dir=dest.parent))
    for file in sorted(manifest.path.iterdir(), key=lambda f: f.name == "meta.json"):
        try:
            os.link(file, tmp / file.name)
        except OSError:
            shutil.copyfile(file, tmp / file.name)
    os.rename(tmp, dest)
    return Manifest(dest)
