"""Stopping when the cluster asks: save last.ckpt, stop cleanly, resume when the job restarts.

Which signal means what (measured on SLURM 22.05, tests/test_slurm.py):
- USR2 (or USR1), `--signal=USR2@N`: the time limit is N s away. The job saves and requeues
  itself (runtime/requeue.py); outside SLURM the user re-runs the command;
- TERM: preemption, `scontrol requeue`, `scancel`, the time limit itself (and `kill`). SLURM
  decides what follows, and the job saves, then makes that decision stand (runtime/requeue.py,
  `settle_term`). A TERM that is not SLURM's (a `kill` inside a running job) stops the job at
  once, as outside SLURM;
- INT (Ctrl-C): as TERM, with exit code 130 (the shell's code for it). A second Ctrl-C before
  the job has stopped stops it at once, without saving (the last saved state is kept).

Whatever the signal, the stage stops cleanly wherever it is:
- while Lightning runs (training, evaluation, labelling) the signal is only recorded; every
  rank learns of it at the next batch (one one-element all-reduce during training), training
  saves `checkpoints/last.ckpt` and the stage stops; a signal that came too late for a batch
  stops the stage when Lightning returns (training saves at its end first);
- anywhere else in a stage the job stops at once: artifacts are written atomically, so nothing
  half-written is left;
- outside a stage (the job finished, or has not begun) the signal is kept: a sweep running in
  this process stops before its next job.
The Lightning side (engine/trainer.py) records signals during fit / test / predict, saves and
stops at the next batch; Lightning's own signal handling is switched off: its SIGTERM handler ends
training at the next step without saving, with exit code 0; its SLURM auto-requeue (USR1,
hpc_ckpt files) would fight ours. DataLoader worker processes ignore the signals (the main
process stops them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("pipeline")

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# "The time limit is near": the job requeues itself. TERM comes when SLURM itself has decided
# (preemption, scontrol requeue, scancel, the limit reached): the job only saves and stops.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# Exit code of a rank started by runtime.launch that stopped on a signal after saving: its
# launcher then acts for the job.
PREEMPTED_EXIT = 3
# Exit code of a job stopped by a signal (docs/design.md); by Ctrl-C, the shell's 128 + SIGINT.
STOPPED_EXIT = 1
INTERRUPTED_EXIT = 128 + signal.SIGINT
DEFAULT_MAX_REQUEUES = 20

_requested: list[int] = []  # signals received and not acted upon yet
_deferring = 0  # > 0 while Lightning runs: act at its next batch, or when it returns
_armed = False  # a stage runs: outside Lightning a signal stops it at once
_owner_pid: int | None = None  # the process that installed the handlers (not a forked worker)
_previous: dict[int, Any] = {}  # the handlers found before ours (submitit's), by signal
_max_requeues = DEFAULT_MAX_REQUEUES
_stopped_by: list[int] = []  # the signal that stopped a job of this process
_interrupts = 0  # Ctrl-Cs received: the second one stops at once
_started_rank = False  # a rank started by runtime.launch (its launcher acts for the job)
_waiting_for_slurm = False  # saved after TERM, waiting for SLURM to end the job


class Preempted(BaseException):
    """Raised on every rank to stop the stage after a signal. A BaseException, like
    KeyboardInterrupt: a request to stop, never caught by the `except Exception` of a library
    (Hydra would record a failed job, submitit a result)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def install(max_requeues: int | None = None, started_rank: bool = False) -> None:
    """Take USR1, USR2, TERM and INT in this process, keeping the handlers found there
    (submitit's) to requeue with. Main thread only (Python's rule for signal handlers).

    `started_rank`: a rank started by runtime.launch leaves the terminal's process group, so
    that a Ctrl-C reaches it once, forwarded by its launcher (which gets it from the terminal),
    and not twice (from the terminal too), which would read as a second Ctrl-C."""
    global _owner_pid, _max_requeues, _started_rank
    if max_requeues is not None:
        _max_requeues = int(max_requeues)
    if threading.current_thread() is not threading.main_thread():
        return
    if started_rank and not _started_rank:
        _started_rank = True
        with contextlib.suppress(OSError):  # (already a group leader: nothing to leave)
            os.setpgid(0, 0)
    _owner_pid = os.getpid()
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is not _on_signal:
            _previous[signum] = current
            signal.signal(signum, _on_signal)


def _who() -> str:
    return f"rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', 0))}"


def _on_signal(signum: int, _frame: Any) -> None:
    global _interrupts
    if os.getpid() != _owner_pid:
        return  # a forked DataLoader worker: the main process stops the work
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        _interrupts += 1
        if _interrupts > 1:
            _stop_at_once()
    _requested.append(signum)
    if _waiting_for_slurm:
        log.info("%s got %s: SLURM acts on the job, stopping", _who(), name)
        return
    if _armed and not _deferring:
        log.warning("%s got %s: stopping now (finished artifacts are kept)", _who(), name)
        raise Preempted(signum)
    if _deferring:
        log.warning(
            "%s got %s: stopping at the next batch (training saves last.ckpt)%s",
            _who(),
            name,
            "; Ctrl-C again stops at once, without saving" if signum == signal.SIGINT else "",
        )
    elif _stopped_by:  # SLURM ending a job that has saved and stopped (after its requeue)
        log.info("%s got %s: the job has stopped already", _who(), name)
    else:
        log.warning("%s got %s outside a stage: stopping before the next one", _who(), name)


def _stop_at_once() -> None:
    """A second Ctrl-C: stop now, without saving; what was saved stays (every file is written
    atomically, and a temporary a kill leaves is removed by the next run)."""
    if _who() == "rank 0":
        print(
            "stopped at once by a second SIGINT, without saving: the last saved state is kept; "
            "re-run the same command to resume from it",
            file=sys.stderr,
            flush=True,
        )
    if _started_rank:  # die by the signal itself: the launcher reads that as a stop
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(INTERRUPTED_EXIT)


def pending() -> int:
    """The signal received and not acted upon yet (0: none)."""
    return _requested[-1] if _requested else 0


def raise_if_pending() -> None:
    if _requested:
        raise Preempted(_requested[-1])


@contextlib.contextmanager
def stage() -> Iterator[None]:
    """A stage runs: from here a signal stops it (at once, or at Lightning's next batch); one
    that came before (between two jobs of a sweep) stops it before it begins."""
    global _armed
    raise_if_pending()
    _armed = True
    try:
        yield
    finally:
        _armed = False


def stage_running() -> bool:
    return _armed


@contextlib.contextmanager
def lightning_running() -> Iterator[None]:
    """Around trainer.fit / test / predict: signals are recorded, not raised (an exception
    while Lightning builds its loaders ends in an unrelated RuntimeError); the callbacks stop at
    the next batch; a signal that came too late for them stops the stage when Lightning
    returns."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _armed and not _deferring:
        raise_if_pending()


# --- what the stop leaves for runtime/requeue.py ----------------------------------------------


def max_requeues() -> int:
    """How many times a job may requeue itself (`max_requeues`, set by `install`)."""
    return _max_requeues


def received() -> int:
    """How many signals were received and not acted upon yet: a new signal raises the count."""
    return len(_requested)


def previous_handler(signum: int) -> Any:
    """The handler found for `signum` before ours (submitit's), if any."""
    return _previous.get(signum)


def record_stop(signum: int) -> None:
    """Preempted reached the entry point: the signal is acted upon, and stopped a job."""
    _requested.clear()
    _stopped_by.append(signum)


@contextlib.contextmanager
def waiting_for_slurm() -> Iterator[None]:
    """Saved after TERM, waiting for SLURM to end the job: a signal then only ends the wait."""
    global _waiting_for_slurm
    _waiting_for_slurm = True
    try:
        yield
    finally:
        _waiting_for_slurm = False


def stopped_by() -> int:
    """The signal that stopped a job of this process (0: none)."""
    return _stopped_by[-1] if _stopped_by else 0


def note(signum: int) -> None:
    """A signal that came while the job's ranks finished their work: no further job starts."""
    _requested.append(signum)
