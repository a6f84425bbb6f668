"""`data=image_folder`: the user's own images. Each set is a folder or WebDataset tar shards:
labelled, test and val as one subfolder per class (or shards with KEY.cls labels), unlabelled
as a flat or nested folder (or shards). Every set is listed once into a manifest; a small set
is decoded into memory, a large one streams from disk (`data.in_memory=auto|true|false`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.arrays import DataBundle, ImageSet
from pipeline.data.bundled import holdout
from pipeline.data.cache import CACHE_CHOICES, open_cache
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
from pipeline.data.streamed import StreamedImages, decode_all, memory_bytes
from pipeline.errors import UserError
from pipeline.runtime.rundir import MANIFESTS, RunDir

log = logging.getLogger(__name__)

IN_MEMORY_CHOICES = ("auto", "true", "false")


def load_image_folder(cfg: dict[str, Any], run: RunDir | None = None) -> DataBundle:
    """Labelled set (required) plus optional unlabelled, test and val sets; their manifests in
    the run dir (checked against the disk when they are there already)."""
    on_bad = cfg.get("on_bad_image") or "fail"
    if on_bad not in ("fail", "skip"):
        raise UserError(f"data.on_bad_image must be 'fail' or 'skip', got {on_bad!r}")
    opener = SetOpener(cfg, run)

    labelled_spec = _spec(cfg, "labelled_dir", required=True)
    if is_shard_spec(labelled_spec):
        classes = [str(i) for i in range(int(cfg.get("num_classes") or 0))]
    else:
        classes = _class_names(labelled_spec, "data.labelled_dir")
    labelled = opener.open("labelled", labelled_spec, classes)

    test_spec = _spec(cfg, "test_dir")
    if test_spec is None:
        hint = "change data.test_fraction or give a data.test_dir"
        train, test = holdout(labelled, cfg.get("test_fraction", 0.2), hint)
    else:
        train, test = labelled, opener.open("test", test_spec, classes)

    val_spec = _spec(cfg, "val_dir")
    val = opener.open("val", val_spec, classes) if val_spec is not None else None

    unlabelled_spec = _spec(cfg, "unlabelled_dir")
    extra = opener.open("unlabelled", unlabelled_spec, None) if unlabelled_spec else None
    return DataBundle("image_folder", classes, train, test, extra, val, opener.num_bad)


class SetOpener:
    """Lists each set into its manifest and opens it in memory or streamed."""

    def __init__(self, cfg: dict[str, Any], run: RunDir | None) -> None:
        self.cfg = cfg
        self.channels = cfg.get("channels") or 3
        self.size = cfg.get("image_size")
        self.skip_bad = (cfg.get("on_bad_image") or "fail") == "skip"
        self.in_memory = str(cfg.get("in_memory", "auto")).lower()
        if self.in_memory not in IN_MEMORY_CHOICES:
            raise UserError(f"data.in_memory={self.in_memory}; choose auto, true or false")
        if self.size is None and self.in_memory != "true":
            raise UserError("data.image_size is not set; give one (images are resized to it)")
        self.limit = float(cfg.get("in_memory_limit_mb") or 1024) * 2**20
        self.run = run
        self.manifest_dir = run / MANIFESTS.rstrip("/") if run is not None else None
        self.cache_dir = Path(cfg.get("cache_dir") or "~/.cache/pipeline").expanduser()
        self.cache = str(cfg.get("cache") or "none").lower()
        if self.cache not in CACHE_CHOICES:
            raise UserError(f"data.cache={self.cache}; choose one of: {', '.join(CACHE_CHOICES)}")
        self.num_bad = 0

    def open(self, name: str, spec: Any, classes: list[str] | None) -> ImageSet:
        key = f"data.{name}_dir"
        manifest = self._manifest(name, spec, classes, key)
        if len(manifest) == 0:
            raise UserError(
                f"{key}={spec} contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                f"add images or unset {key}"
            )
        labels = manifest.labels
        if classes is not None:
            _check_classes(labels, classes, spec, key)
        images = StreamedImages(manifest, self.channels, self.size or 0)
        decoded = memory_bytes(len(manifest), self.channels, self.size or 0)
        if self.in_memory == "true" or (self.in_memory == "auto" and decoded <= self.limit):
            arrays = decode_all(images, self.skip_bad, key)
            self.num_bad += len(images) - len(arrays)
            if classes is not None:
                _check_classes(arrays.labels.numpy(), classes, spec, key, "readable ")
            if len(arrays) == 0:
                raise UserError(f"no readable image in {key}={spec}")
            return arrays
        log.info("%s streams from disk: %d images", key, len(images))
        if self.cache == "decoded":  # decoded once into mapped shards, then read from them
            return open_cache(images, self.cache_dir, self.skip_bad)
        return images

    def _manifest(self, name: str, spec: Any, classes: list[str] | None, key: str) -> Manifest:
        """The set's manifest in the run: the one made when the run started (refused if the
        disk changed since), or a snapshot of the cached listing (rank 0 makes it, every rank
        reads it). Without a run dir, the cached listing itself."""
        own = self.manifest_dir / name if self.manifest_dir is not None else None
        # Rank 0 decides whether the run has it (every rank then takes the same branch).
        if own is not None and self.run.exists(own / "meta.json"):

            def check() -> None:
                changed = changes(Manifest(own))
                if changed:
                    raise UserError(
                        f"{key} changed since this run started ({changed}); restore it, or "
                        "start a new run (another run_dir=, or overwrite=true)"
                    )

            self.run.on_rank_zero(check)
            return Manifest(own)

        def make() -> Listing:
            if is_shard_spec(spec):
                listing = list_shards(expand_shards(spec, f"{name}_dir"))
                if classes is not None and listing.labels is None:
                    raise UserError(f"{key}={spec} has no KEY.cls labels; it must be labelled")
                if classes is not None and (listing.labels < 0).any():
                    missing = np.flatnonzero(listing.labels < 0)
                    first = listing.keys[missing[0]]
                    first = first.decode() if isinstance(first, bytes) else first
                    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                    raise UserError(
                        f"{key}={spec}: sample {first}{more} has no KEY.cls "
                        "label; add one to each sample of a labelled set, or move the unlabelled "
                        "ones to data.unlabelled_dir"
                    )
                return listing
            return list_folder(Path(spec), classes)

        if own is None:  # no run dir: every process reads the cache (the first one makes it)
            return cached(spec, classes, self.cache_dir, make)

        def make_own() -> None:
            own.parent.mkdir(parents=True, exist_ok=True)
            snapshot(cached(spec, classes, self.cache_dir, make), own)

        self.run.on_rank_zero(make_own)  # every rank gets the manifest, or rank 0's error
        return Manifest(own)


def _spec(cfg: dict[str, Any], key: str, required: bool = False) -> Any:
    """The folder or shard spec under data.<key>, or None when the optional key is unset."""
    value = cfg.get(key)
    if not value:
        if required:
            raise UserError(
                f"data.{key} is not set; set it to a folder with one subfolder per class"
            )
        return None
    if is_shard_spec(value):
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"data.{key}={path} does not exist; fix the path")
    if not path.is_dir():
        raise UserError(f"data.{key}={path} is not a directory; point it at a folder")
    return path


def _subfolders(root: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, ...) are never classes.
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(root: Path, key: str) -> list[str]:
    names = [p.name for p in _subfolders(root)]
    if not names:
        raise UserError(f"{key}={root} has no class subfolders; put each class in its own folder")
    return names


def _check_classes(
    labels: np.ndarray | None, classes: list[str], spec: Any, key: str, what: str = ""
) -> None:
    """Every class has images, and (class trees) the folders are the labelled tree's."""
    if not is_shard_spec(spec) and key != "data.labelled_dir":
        names = {p.name for p in _subfolders(Path(spec))}
        missing, extra = sorted(set(classes) - names), sorted(names - set(classes))
        if missing or extra:
            raise UserError(
                f"{key}={spec} must have the same class folders as data.labelled_dir; "
                f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
            )
    counts = np.bincount(labels[labels >= 0], minlength=len(classes)) if labels is not None else []
    for c, name in enumerate(classes):
        if len(counts) and counts[c] == 0:
            where = Path(spec) / name if not is_shard_spec(spec) else f"{spec} (class {c})"
            if what:
                raise UserError(f"class folder {where} ({key}) has no {what}image")
            raise UserError(
                f"class folder {where} ({key}) contains no images; add some or remove it"
            )
    if labels is not None and len(labels) and labels.max() >= len(classes):
        raise UserError(
            f"{key}={spec} has labels up to {labels.max()}, data.num_classes={len(classes)}; "
            f"set data.num_classes={int(labels.max()) + 1}"
        )
