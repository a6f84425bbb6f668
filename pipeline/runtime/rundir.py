"""The run directory and the protocol every stage follows in it.

A piece of work (a round, a pretraining, a fine-tuning) is a *step*: a folder whose
`metrics.json` is written last, so its presence means the step is finished and a resumed run
reads it instead of redoing the work. Shared files are written by rank 0 only, atomically (a
temporary name, then a rename), and every rank meets at a barrier after each write. When a step
finishes, its resume state (last.ckpt, prediction shards) is removed. Stage recipes say only
what is computed; the rank checks of the pipeline live here and in the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.errors import UserError
from pipeline.runtime import dist, io
from pipeline.runtime.run_lock import LOCK, acquire_lock, release_lock

# (saved config, this config) -> the result keys in which they differ
Differing = Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class JobConfig:
    """The job's config as the run dir records and checks it. The entry point makes it (the
    runtime knows neither the config's keys nor its file format): the resolved config as plain
    values, the text of config.yaml and of the command's overrides, how to read a saved
    config.yaml back, and which result keys two configs differ in (config.keys.differing_keys)."""

    values: Mapping[str, Any]
    text: str
    overrides_text: str | None
    read: Callable[[Path], Mapping[str, Any]]
    differing: Differing

    @property
    def overwrite(self) -> bool:
        return bool(self.values["overwrite"])


log = logging.getLogger("pipeline")
T = TypeVar("T")

DONE = "metrics.json"  # the last file a step writes: its presence means the step is finished
MODEL = "model.ckpt"  # a step's trained network, when it trains one
RESUME_STATE = ("checkpoints", "pseudo_shards")  # what a step keeps only while it runs
CONFIG = "config.yaml"
OVERRIDES = ".hydra/overrides.yaml"  # the command's overrides, where Hydra itself keeps them
MANIFESTS = "manifest/"  # the listings of the run's image sets (data/manifest.py)


class RunDir:
    """A run's directory: its config check, its steps, rank-0 writes and phase timings."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.phases: dict[str, float] = defaultdict(float)  # where this job's time went
        # What watches the run (its loggers, engine/loggers.py; set on rank 0 by the entry
        # point): `.lightning` the Lightning loggers, `.prefix(step_path)` its metrics' prefix,
        # `.step_finished(step_path, metrics)` told of every finished step.
        self.tracker: Any = None
        self.cpu_start = time.process_time()  # this process's CPU seconds (all its threads)
        self._lock_fd: int | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- starting a run -------------------------------------------------------------------

    def check_config(self, cfg: JobConfig, requeued: bool = False) -> None:
        """Refuse a run_dir made by another config (naming the keys `cfg.differing` finds
        between the saved config and this one), or clear it on overwrite=true (not for a
        requeued job: it must resume). Writes nothing else."""
        saved = self.path / CONFIG
        if not saved.exists():
            return
        try:
            old = cfg.read(saved)
        except Exception:
            raise UserError(
                f"{saved} is unreadable; move the run_dir away or pass overwrite=true"
            ) from None
        if cfg.overwrite and requeued:
            log.info("overwrite=true, but this is a requeued job: resuming %s", self.path)
        elif cfg.overwrite:
            log.warning("overwrite=true: clearing %s and starting over", self.path)
            for child in self.path.iterdir():
                if child.name != LOCK:  # this run's own lock
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            return
        diff = cfg.differing(old, cfg.values)
        if not diff:
            return
        # What a run is (stage, data, model, seed) first: a different dataset differs in many keys.
        leading = ("stage", "data.name", "model.name", "seed")
        diff.sort(key=lambda k: leading.index(k) if k in leading else len(leading))
        shown = ", ".join(f"{k} ({_value(old, k)} -> {_value(cfg.values, k)})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise UserError(
            f"run_dir {self.path} was made by another config: {shown}{more}; use another "
            "run_dir=, or overwrite=true to start it over"
        )

    def check_config_on_every_rank(self, cfg: JobConfig, requeued: bool = False) -> None:
        """Under srun / torchrun every rank composed the config itself: rank 0 checks that all
        resolved the same run_dir (a clock in hydra.sweep.dir reads differently in each rank)
        and checks the run_dir once; every rank gets the verdict."""
        dirs = sorted({str(d) for d in dist.all_gather_object(str(self.path))})

        def check() -> None:
            if len(dirs) > 1:
                raise UserError(
                    f"the ranks resolved different run dirs ({dirs[0]} and {dirs[-1]}), e.g. "
                    "from a timestamp in hydra.sweep.dir; pass a fixed one: "
                    "hydra.sweep.dir=multirun/NAME (with -m) or run_dir=PATH"
                )
            self.check_config(cfg, requeued)

        self.on_rank_zero(check)

    def begin(self, cfg: JobConfig) -> None:
        """Create the folder, remove temporaries a killed run left, record the config (and the
        command's overrides, which the report's reproduce commands use) if not there yet.
        Rank 0 does it; every rank waits for it."""
        self._rank_zero_write(self._begin, cfg)

    def _begin(self, cfg: JobConfig) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, no permission, a read-only disk
            raise UserError(
                f"run_dir={self.path} cannot be created ({e.strerror or type(e).__name__}); "
                "pass run_dir= a folder you can write to"
            ) from None
        io.remove_stale_temporaries(self.path)
        if not (self.path / CONFIG).exists() or cfg.overwrite:
            io.write_text(self.path / CONFIG, cfg.text)
            if cfg.overrides_text is not None:
                io.write_text(self.path / OVERRIDES, cfg.overrides_text)

    def entries_before(self) -> set[str] | None:
        """What a run_dir without config.yaml holds before this command (None: it has a
        config.yaml, so it is a run's and bad input leaves it exactly as it is)."""
        if (self.path / CONFIG).exists():
            return None
        return set(os.listdir(self.path)) if self.path.is_dir() else {"<absent>"}

    def undo_new(self, before: set[str] | None) -> None:
        """Bad input found after this command began a new run_dir (e.g. in the data): remove
        what it wrote (config, splits, manifests, empty folders), so that the fixed command is not refused
        as "another config" and the folder is as it was. Work already done is never removed."""
        if before is None or not self.path.is_dir():
            return
        new = [self.path / n for n in os.listdir(self.path) if n not in before]
        recorded = {CONFIG, "splits.npz", OVERRIDES, LOCK}
        files = [f for p in new for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        names = [f.relative_to(self.path).as_posix() for f in files]
        if any(n not in recorded and not n.startswith(MANIFESTS) for n in names):
            return
        for p in new:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if before == {"<absent>"} and not any(self.path.iterdir()):
            self.path.rmdir()

    # --- one live run per run_dir ------------------------------------------------------------

    def lock(self) -> None:
        """Hold the run_dir's lock while this run lives, or refuse (RunDirBusy, exit 2) when
        another live run holds it (runtime/run_lock.py)."""
        self._lock_fd = acquire_lock(self.path)

    def unlock(self) -> None:
        """Release the lock (and remove its file: a finished run_dir holds only its results)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            release_lock(self.path, fd)

    # --- steps and shared writes ------------------------------------------------------------

    def step(self, name: str = "") -> Step:
        """The step in folder `name` ("" : the run_dir itself)."""
        return Step(self, self.path / name if name else self.path)

    def exists(self, *paths: Path) -> bool:
        """Whether every path exists, as rank 0 sees it (every rank takes the same branch)."""
        found = all(Path(p).exists() for p in paths) if dist.is_rank_zero() else None
        return bool(dist.broadcast_object(found))

    def checkpoint_intact(self, path: Path) -> bool:
        """Whether `path` exists and is an intact checkpoint, as rank 0 sees it (every rank
        takes the same branch). A damaged one (cut short, garbled, altered after it was written:
        its checksum) is set aside as `NAME.damaged-<time>` with a warning, so that the step that
        wrote it runs again instead of failing on every re-run."""
        return bool(self.on_rank_zero(lambda: Path(path).exists() and _intact(Path(path))))

    def on_rank_zero(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 only; every rank gets its result, or its UserError."""
        result: Any = None
        if dist.is_rank_zero():
            try:
                result = work()
            except UserError as e:
                result = e
        result = dist.broadcast_object(result)
        if isinstance(result, UserError):
            raise result
        return result

    def write_json(self, path: Path, data: Any) -> None:
        self._rank_zero_write(io.write_json, path, data)

    def write_npz(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self._rank_zero_write(io.write_npz, path, arrays)

    def save_checkpoint(self, path: Path, checkpoint: dict[str, Any]) -> None:
        self._rank_zero_write(io.save_checkpoint, path, checkpoint)

    def copy_files(self, src: Path, dst: Path, names: tuple[str, ...]) -> None:
        """Copy files from one folder to another, each atomically, in the order given."""

        def copy() -> None:
            for name in names:
                with io.atomic_path(dst / name) as tmp:
                    shutil.copyfile(src / name, tmp)

        self._rank_zero_write(copy)

    def _rank_zero_write(self, write: Callable[..., None], *args: Any) -> None:
        if dist.is_rank_zero():
            write(*args)
        dist.barrier()

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in the block to `phases[phase]` (summary.json's phase_seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] += time.perf_counter() - start


@dataclass
class Step:
    """One resumable piece of work of a run: finished when its metrics.json exists."""

    run: RunDir
    path: Path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def done(self) -> bool:
        """Finished: its metrics.json exists (and its model.ckpt, if it has one, is intact).
        A finished step whose model.ckpt was damaged since (flipped bits, a bad copy) runs
        again: its metrics.json is set aside with it (rank 0 decides, every rank follows)."""

        def check() -> bool:
            if not (self.path / DONE).exists():
                return False
            model = self.path / MODEL
            if not model.exists() or _intact(model):
                return True
            io.set_aside(self.path / DONE)
            return False

        return bool(self.run.on_rank_zero(check))

    def result(self) -> dict[str, Any]:
        """The finished step's metrics (and its resume state removed: a kill right after
        metrics.json may have left it)."""
        self.clean()
        return io.read_json(self.path / DONE)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Write metrics.json (the step is then finished), tell the run's loggers, and remove the
        resume state."""
        self.run.write_json(self.path / DONE, metrics)
        if self.run.tracker is not None and dist.is_rank_zero():
            self.run.tracker.step_finished(self.path, metrics)
        self.clean()
        return metrics

    def clean(self) -> None:
        """Remove what the step keeps only while it runs: last.ckpt (a copy of model.ckpt plus
        the optimizer, once finished) and stale prediction shards."""
        if dist.is_rank_zero():
            for leftover in RESUME_STATE:
                shutil.rmtree(self.path / leftover, ignore_errors=True)
        dist.barrier()


def _intact(path: Path) -> bool:
    """Whether a checkpoint loads and matches its checksum; a damaged one is set aside."""
    try:
        io.load_checkpoint(path)
    except io.DamagedCheckpoint as e:
        aside = io.set_aside(path)
        log.warning("%s; set aside as %s: it is made again", str(e).split("; ")[0], aside.name)
        return False
    return True


def _value(values: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key of a plain config ("<unset>" where there is none)."""
    node: Any = values
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return "<unset>"
    return node
