"""One live run per run_dir: the run_dir's lock (`run_dir/.lock`), held by the live run and
refused to a second one (RunDirBusy, exit 2) with who holds it; RunDir.lock / unlock use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.runtime import io

log = logging.getLogger("pipeline")

LOCK = ".lock"  # held (flock) by the live run of this run_dir; removed when it ends


class RunDirBusy(UserError):
    """Another live run holds the run_dir's lock: nothing was changed."""


def acquire_lock(run_dir: Path) -> int:
    """Hold `run_dir`'s lock (the descriptor of its lock file, locked), or refuse (RunDirBusy,
    exit 2) when another live run holds it. Taken by the process that runs the job: the one
    process, the launcher of the ranks it starts (they run under its lock), or global rank 0
    under srun or torchrun.

    fcntl.flock on `run_dir/.lock`: the kernel releases it when its process dies however it
    dies (kill -9 included), so a stale lock is taken over simply by locking it, without
    guessing from pids. Two cases a stale lock can still be held, on a network file system
    whose server keeps a dead client's lock for its lease: a process of this host that is
    gone, and the same SLURM job after a requeue (same job id, later restart count): then
    the lock file is replaced by a new one, which this run locks."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"run_dir={run_dir} cannot be created ({e.strerror or type(e).__name__}); "
            "pass run_dir= a folder you can write to"
        ) from None
    path = run_dir / LOCK
    for _ in range(10):  # each retry follows a lock file removed or replaced meanwhile
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in io.WRITE_ERRORS:
                raise UserError(io.write_error_line(path, e.errno)) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if not _stale(holder):
                raise RunDirBusy(_busy_line(run_dir, holder)) from None
            log.warning("taking over the lock of %s from %s (gone)", run_dir, holder)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the run that held it ended and removed it: lock the new file
            os.close(fd)
            continue
        _write_holder(fd)
        return fd
    raise RunDirBusy(f"run_dir {run_dir} is being locked and released by other runs; retry")


def release_lock(run_dir: Path, fd: int) -> None:
    """Release the lock (and remove its file: a finished run_dir holds only its results)."""
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == os.stat(run_dir / LOCK).st_ino:
            os.unlink(run_dir / LOCK)  # before the close: a waiting run sees it replaced
    os.close(fd)


def _holder_info() -> dict[str, Any]:
    from pipeline.runtime import requeue

    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "slurm_job_id": requeue.slurm_job_id(),
        "slurm_restart_count": requeue.restart_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of a refused run. Written in place, not through the
    atomic writer: a rename would put another file (inode) under the name than the one locked."""
    with contextlib.suppress(OSError):  # informative only: a full disk stops the run elsewhere
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)


def _lock_holder(fd: int) -> dict[str, Any]:
    try:
        return dict(json.loads(os.pread(fd, 4096, 0) or b"{}"))
    except (OSError, ValueError, TypeError):
        return {}


def _stale(holder: dict[str, Any]) -> bool:
    """A lock still held for a run that is gone (see RunDir.lock)."""
    me = _holder_info()
    job = holder.get("slurm_job_id")
    if job and job == me["slurm_job_id"]:
        return int(holder.get("slurm_restart_count") or 0) < me["slurm_restart_count"]
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _busy_line(path: Path, holder: dict[str, Any]) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    if holder.get("slurm_job_id"):
        who += f", SLURM job {holder['slurm_job_id']}"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return (
        f"run_dir {path} is in use by another live run ({who}{since}); wait for it to end "
        "(or stop it), or pass another run_dir="
    )
